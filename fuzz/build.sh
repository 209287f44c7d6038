#!/usr/bin/env bash
# Build the libFuzzer targets into build-fuzz/ (or $1): the engine's C++ sources instrumented for coverage,
# with AddressSanitizer and UBSan. Needs clang (Debian: apt-get install -y clang).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build-fuzz}"
if ! command -v clang++ >/dev/null 2>&1; then
  echo "fuzz/build.sh: clang++ not found; install clang (Debian/Ubuntu: apt-get install -y clang)" >&2
  exit 1
fi
cmake -S . -B "$out" -DTP_CUDA=OFF -DTP_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$out" --target tp_fuzz_gguf -j"${TP_FUZZ_JOBS:-2}"
echo "built: $out/fuzz/tp_fuzz_gguf"
