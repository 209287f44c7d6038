#!/usr/bin/env bash
# Run one fuzzer for a given time:  fuzz/run.sh gguf|tokenizer|image|chat SECONDS [extra libFuzzer flags...]
#   gguf       the C++ GGUF reader + engine load (libFuzzer, ASan+UBSan; built by fuzz/build.sh if missing)
#   tokenizer  the Python tokenizer from GGUF metadata (atheris: pip install atheris; uses build/ or the
#              installed package for the native GGUF reader)
#   image      image decoding + Qwen2.5-VL preprocessing (atheris; Pillow)
#   chat       the chat-template renderer (atheris; jinja2)
# Starts from the committed seeds in fuzz/corpus/TARGET and keeps what it finds in build-fuzz/corpus-TARGET
# (so the committed corpus stays small); crashes go to build-fuzz/artifacts/TARGET/. libFuzzer's final
# stats (executions, cov, ft) are printed at the end; the exit status is non-zero when a crash was found.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: fuzz/run.sh gguf|tokenizer|image|chat SECONDS [libFuzzer flags...]"
target="${1:?$usage}"
secs="${2:?$usage}"
shift 2
out=build-fuzz
mkdir -p "$out/corpus-$target" "$out/artifacts/$target"
dict=()
case "$target" in gguf|tokenizer) dict=(-dict=fuzz/gguf.dict) ;; esac
common=(-max_total_time="$secs" -print_final_stats=1 -timeout=30 "${dict[@]}"
        -artifact_prefix="$out/artifacts/$target/" "$@" "$out/corpus-$target" "fuzz/corpus/$target")
case "$target" in
  gguf)
    [ -x "$out/fuzz/tp_fuzz_gguf" ] || fuzz/build.sh "$out"
    # detect_leaks: the engine must free everything on every error path, so a leak is a finding too.
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}" \
      exec "$out/fuzz/tp_fuzz_gguf" -max_len=65536 "${common[@]}"
    ;;
  tokenizer|image|chat)
    # The package from python/ when a library is built in build/ (or named by TURBOPREFILL_LIB), else the
    # installed one (CI, after `pip install .`).
    if [ -e build/libturboprefill.so ] || [ -n "${TURBOPREFILL_LIB:-}" ]; then
      export PYTHONPATH="python${PYTHONPATH:+:$PYTHONPATH}"
    fi
    exec python3 "fuzz/${target}_fuzz.py" -max_len=16384 -rss_limit_mb=4096 "${common[@]}"
    ;;
  *)
    echo "fuzz/run.sh: unknown target '$target' (expected gguf, tokenizer, image or chat)" >&2
    exit 2
    ;;
esac
