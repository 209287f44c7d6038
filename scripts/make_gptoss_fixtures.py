#!/usr/bin/env python3
"""Write the llama.cpp oracle fixtures of two synthetic gpt-oss models (run it again only to refresh them).

Owns tests/fixtures/logits_gptoss-<name>.npz + .json. The models are not committed: the JSON records the
writer's arguments and the file's sha256, and tests regenerate the file bit-identically with
turboprefill.writer.write_model (then check the hash before comparing anything).

- A: MXFP4 experts (llama.cpp's MXFP4_MOE mix), n_embd 256, 8 experts top-2, 8 query / 2 KV heads of 64.
- B: Q4_K_M with every shape fallback (n_embd 320 and n_ff_exp 96 are not multiples of 256: Q4_K -> Q5_0,
  Q6_K -> Q8_0; attn_output's rows of 512 stay Q4_K), 16 experts top-4.

Prompt: seeded uniform random token ids, about 1100 of them (well past the 128-token window of the even
layers). Its length is then chosen in [1024, 1100] so that the last token's routing margin (k-th minus
(k+1)-th router logit, minimum over layers, in the float64 reference) is at least MIN_MARGIN: llama.cpp's
activations carry ~1e-2 of noise into the router logits (measured on a variant of B with n_ff_exp 128: a
last-token cosine of 0.9987 at a 5e-4 margin against a median of 0.9999 over all positions), and a routing
flip is chaos, not a bug. The margin comes from our reference, not from llama.cpp, so the choice does not
look at the answer (both fixtures' prompts kept all 1100 tokens: margins 0.24 and 0.19).

Stored: llama.cpp's logits (n_batch 512, CPU, 2 threads, f16 KV cache, flash attention off) of the last
N_TAIL prompt positions as float16 (the last row is the last token), the prompt ids, and in the JSON the
settings, the llama-cpp-python version, and llama.cpp's own cosine between n_batch 512 and 64.

Usage: PYTHONPATH=python python scripts/make_gptoss_fixtures.py [--out tests/fixtures]
Needs: the built native library (the writer quantizes with it), pip install llama-cpp-python gguf numpy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reference_moe, the float64 oracle

# name -> write_model keyword arguments (arch "gpt-oss"); the JSON repeats them for the tests.
MODELS = {
    "A": dict(n_layer=4, n_embd=256, n_head=8, n_head_kv=2, head_dim=64, n_expert=8, n_expert_used=2,
              n_ff_exp=256, n_vocab=512, n_ctx=4096, quant="mxfp4", seed=1),
    "B": dict(n_layer=4, n_embd=320, n_head=8, n_head_kv=2, head_dim=64, n_expert=16, n_expert_used=4,
              n_ff_exp=96, n_vocab=512, n_ctx=4096, quant="q4_k_m", seed=2),
}  # fmt: skip
PROMPT_SEED = {"A": 101, "B": 102}
MAX_TOKENS, MIN_TOKENS = 1100, 1024
MIN_MARGIN = 0.03  # router-logit margin of the last token; see the module docstring
N_TAIL = 32  # positions whose logits are stored
N_CTX = 2048  # llama.cpp context for the run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_logits(llama_cpp, path: Path, ids: list[int], n_batch: int) -> np.ndarray:
    """llama.cpp's logits of every prompt position [T, n_vocab] (float32)."""
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=2,
        n_threads_batch=2,
        logits_all=True,
        verbose=False,
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def routing_margin(routing: list, n_tokens: int) -> np.ndarray:
    """Per position, the smallest (k-th − (k+1)-th) router logit over layers [T]."""
    margin = np.full(n_tokens, np.inf)
    for logits, ids in routing:
        s = -np.sort(-logits, axis=-1)
        k = ids.shape[1]
        margin = np.minimum(margin, s[:, k - 1] - s[:, k])
    return margin


def make_one(llama_cpp, name: str, out_dir: Path, tmp: Path) -> dict:
    from reference_moe import load_gptoss_model

    from turboprefill.writer import write_model

    kw = MODELS[name]
    path = tmp / f"gptoss-{name}.gguf"
    info = write_model(path, "gpt-oss", **kw)
    rng = np.random.default_rng(PROMPT_SEED[name])
    full = [int(t) for t in rng.integers(0, kw["n_vocab"], MAX_TOKENS)]

    routing: list = []
    ref = load_gptoss_model(path).forward(full, all_logits=True, routing=routing)  # causal: prefixes agree
    margin = routing_margin(routing, MAX_TOKENS)
    n = max(t for t in range(MIN_TOKENS, MAX_TOKENS + 1) if margin[t - 1] >= MIN_MARGIN)
    ids = full[:n]

    l512 = llama_logits(llama_cpp, path, ids, 512)
    l64 = llama_logits(llama_cpp, path, ids, 64)
    tail = l512[-N_TAIL:]
    ref_tail = ref[n - N_TAIL : n]
    cos_ref = [cosine(a, b) for a, b in zip(ref_tail, tail)]
    meta = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "arch": "gpt-oss",
        "writer_kwargs": kw,
        "model_sha256": sha256(path),
        "model_bytes": path.stat().st_size,
        "tensor_types": sorted({t["type"] for t in info["tensors"].values()}),
        "prompt": f"numpy default_rng({PROMPT_SEED[name]}).integers(0, n_vocab, {MAX_TOKENS}), first n_tokens",
        "n_tokens": n,
        "last_token_routing_margin": float(margin[n - 1]),
        "n_tail": N_TAIL,
        "settings": {
            "backend": "cpu",
            "n_ctx": N_CTX,
            "n_batch": 512,
            "n_ubatch": 512,
            "n_threads": 2,
            "logits_all": True,
            "flash_attn": False,
            "kv_cache": "f16 (llama.cpp default)",
        },
        "cosine_nbatch512_vs_64_last": cosine(l512[-1], l64[-1]),
        "cosine_nbatch512_vs_64_min_tail": min(cosine(a, b) for a, b in zip(tail, l64[-N_TAIL:])),
        "measured_cosine_reference_vs_llama_last": cos_ref[-1],
        "measured_cosine_reference_vs_llama_tail_median": float(np.median(cos_ref)),
        "measured_cosine_reference_vs_llama_tail_min": float(np.min(cos_ref)),
        "argmax_last": int(np.argmax(tail[-1])),
        "npz_keys": "tokens int32 [n_tokens]; logits_tail_f16 float16 [n_tail, n_vocab] = llama.cpp's logits of "
        "positions n_tokens-n_tail .. n_tokens-1 (n_batch 512)",
    }
    np.savez_compressed(
        out_dir / f"logits_gptoss-{name}.npz",
        tokens=np.asarray(ids, dtype=np.int32),
        logits_tail_f16=tail.astype(np.float16),
    )
    (out_dir / f"logits_gptoss-{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(
        f"gptoss-{name}: {n} tokens, {meta['model_bytes'] / 1e6:.2f} MB, margin {margin[n - 1]:.4f}, "
        f"cos(ref, llama) last {cos_ref[-1]:.6f} median {np.median(cos_ref):.6f} min {min(cos_ref):.6f}, "
        f"llama 512 vs 64 {meta['cosine_nbatch512_vs_64_last']:.9f}",
        flush=True,
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)

    import llama_cpp

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            make_one(llama_cpp, name, args.out, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
