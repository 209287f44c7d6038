"""The two real PyPI models against llama.cpp's logits (fixtures from scripts/make_fixtures.py), and the
pipeline's bit-identity on a real model. Skipped, with the pip command, when a model is not installed."""

from __future__ import annotations

import numpy as np
import pytest

from turboprefill import Engine

from realmodel_check import compare, load_prompts, passes


@pytest.fixture(scope="module")
def engines(smollm2_path, gemma3_path):
    return {"smollm2": Engine(smollm2_path, devices="cpu", threads=2, ubatch=256, n_ctx=2048),
            "gemma3-270m": Engine(gemma3_path, devices="cpu", threads=2, ubatch=256, n_ctx=2048)}


@pytest.mark.realmodel
@pytest.mark.parametrize("model,index", [("smollm2", 0), ("smollm2", 1), ("smollm2", 2), ("gemma3-270m", 0),
                                         ("gemma3-270m", 1), ("gemma3-270m", 2)])
def test_logits_agree_with_llama_cpp(engines, fixtures_dir, model, index):
    p = load_prompts(fixtures_dir, model)[index]
    eng = engines[model]
    eng.reset()
    m = compare(eng.prefill(p["tokens"]).logits, p["logits"])
    assert passes(m), m


@pytest.mark.realmodel
def test_gemma_prompt_crosses_the_sliding_window(fixtures_dir):
    """Guard that the fixtures really test the window: the longest Gemma prompt exceeds 512 tokens."""
    assert max(len(p["tokens"]) for p in load_prompts(fixtures_dir, "gemma3-270m")) > 512


@pytest.mark.realmodel
def test_real_model_tokenize_and_generate(engines):
    eng = engines["smollm2"]
    eng.reset()
    ids = eng.tokenize("The capital of France is")
    out = eng.detokenize(eng.generate(ids, max_new_tokens=3))
    assert "Paris" in out


@pytest.mark.realmodel
def test_smollm2_schedules_bit_identical(smollm2_path, fixtures_dir):
    toks = load_prompts(fixtures_dir, "smollm2")[0]["tokens"][:200]
    out = {}
    for schedule in ("sequential", "pipelined"):
        eng = Engine(smollm2_path, devices="cpu:0,cpu:1", threads=1, ubatch=64, schedule=schedule, n_ctx=512)
        out[schedule] = (eng.prefill(toks).logits, eng.kv_digest())
    assert np.array_equal(out["sequential"][0], out["pipelined"][0])
    assert out["sequential"][1] == out["pipelined"][1]
