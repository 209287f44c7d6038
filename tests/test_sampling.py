"""Sampling (turboprefill.sampling): each parameter's effect on a known distribution, determinism with a seed,
stop strings across token boundaries, logprob values; and greedy chat == Engine.generate on a real model."""

from __future__ import annotations

import numpy as np
import pytest

from turboprefill.sampling import Generation, Sampler, SamplingError, SamplingParams, TextStream, log_softmax

# A distribution with known probabilities: p = [0.5, 0.3, 0.15, 0.05] over tokens 0..3.
P = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(P).astype(np.float32)
N_DRAWS = 20000  # frequencies within ~4 sigma: sqrt(0.25 / 20000) = 0.0035 -> tolerance 0.015


def freqs(params: SamplingParams, logits=LOGITS, n=N_DRAWS) -> np.ndarray:
    s = Sampler(params)
    return np.bincount([s.sample(logits) for _ in range(n)], minlength=logits.size) / n


def test_greedy_is_argmax_and_ignores_the_seed():
    for seed in (0, 1, None):
        assert Sampler(SamplingParams(temperature=0, seed=seed)).sample(LOGITS) == 0
    z = np.array([1.0, 3.0, 3.0, -1.0], np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(z) == int(np.argmax(z))  # ties: the first, as argmax


def test_temperature_one_reproduces_the_distribution():
    np.testing.assert_allclose(freqs(SamplingParams(seed=1)), P, atol=0.015)


def test_temperature_scales_the_logits():
    want = np.exp(np.log(P) / 0.5)
    np.testing.assert_allclose(freqs(SamplingParams(temperature=0.5, seed=2)), want / want.sum(), atol=0.015)


def test_top_k_keeps_the_k_most_likely():
    f = freqs(SamplingParams(top_k=2, seed=3))
    np.testing.assert_allclose(f, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    assert freqs(SamplingParams(top_k=1, seed=3), n=200).tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.75, 2), (0.9, 3), (0.99, 4)])
def test_top_p_keeps_the_smallest_head_reaching_p(top_p, kept):
    f = freqs(SamplingParams(top_p=top_p, seed=4))
    want = np.where(np.arange(4) < kept, P, 0)
    np.testing.assert_allclose(f, want / want.sum(), atol=0.015)


@pytest.mark.parametrize("min_p, kept", [(0.05, 4), (0.2, 3), (0.5, 2), (0.9, 1)])
def test_min_p_keeps_tokens_above_a_share_of_the_best(min_p, kept):
    # kept: p >= min_p * 0.5
    f = freqs(SamplingParams(min_p=min_p, seed=5))
    want = np.where(np.arange(4) < kept, P, 0)
    np.testing.assert_allclose(f, want / want.sum(), atol=0.015)


def test_filters_apply_before_temperature():
    # llama.cpp's order: top_p on the untempered distribution keeps {0, 1}; temperature 2 then flattens them
    f = freqs(SamplingParams(top_p=0.75, temperature=2.0, seed=6))
    w = np.sqrt(P[:2])
    np.testing.assert_allclose(f, list(w / w.sum()) + [0, 0], atol=0.015)


def test_seed_makes_draws_reproducible():
    s1, s2, s3 = (Sampler(SamplingParams(seed=s)) for s in (7, 7, 8))
    d1 = [s1.sample(LOGITS) for _ in range(64)]
    d2 = [s2.sample(LOGITS) for _ in range(64)]
    d3 = [s3.sample(LOGITS) for _ in range(64)]
    assert d1 == d2 and d1 != d3


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2), prompt=[0, 5, 1])  # last 2: {5, 1}
    z = np.array([2.0, -2.0, 1.0, 4.0, 0.0, 3.0], np.float32)
    np.testing.assert_array_equal(s.penalize(z), [2.0, -4.0, 1.0, 4.0, 0.0, 1.5])
    s.accept(3)  # window slides: {1, 3}
    np.testing.assert_array_equal(s.penalize(z), [2.0, -4.0, 1.0, 2.0, 0.0, 3.0])


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[2, 2, 2])
    z = np.zeros(4, np.float32)
    np.testing.assert_array_equal(s.penalize(z), z)  # the prompt does not count
    for t in (1, 1, 3):
        s.accept(t)
    np.testing.assert_allclose(s.penalize(z), [0, -(0.5 + 2 * 0.25), 0, -(0.5 + 0.25)])


def test_penalty_changes_the_greedy_choice():
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0))
    s.accept(0)
    assert s.sample(LOGITS) == 1  # log 0.5 - 2 < log 0.3


def test_logprobs_are_the_raw_log_softmax():
    params = SamplingParams(temperature=0.3, top_k=1, repeat_penalty=1.5, logprobs=True, top_logprobs=3)
    s = Sampler(params, prompt=[0])
    z = LOGITS + 7.0  # a shift changes nothing
    lp = s.logprob(z, 2)
    assert lp.token == 2 and lp.logprob == pytest.approx(np.log(0.15), abs=1e-6)
    assert [t for t, _ in lp.top] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in lp.top], np.log(P[:3]), atol=1e-6)
    np.testing.assert_allclose(np.exp(log_softmax(z)).sum(), 1.0)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.1, "[0.0, 2.0]"), ("temperature", 2.5, "[0.0, 2.0]"), ("temperature", "hot", "number"),
    ("top_p", 1.5, "[0.0, 1.0]"), ("min_p", -1, "[0.0, 1.0]"), ("top_k", -1, "[0, inf]"), ("top_k", 1.5, "integer"),
    ("repeat_penalty", 0, "(0.0, 10.0]"), ("presence_penalty", 3, "[-2.0, 2.0]"),
    ("frequency_penalty", -2.5, "[-2.0, 2.0]"), ("max_tokens", 0, "[1, inf]"), ("top_logprobs", 21, "[0, 20]"),
    ("stop", [""], "non-empty"), ("stop", ["a"] * 17, "at most 16"), ("seed", 1.5, "integer"),
    ("temperature", float("nan"), "number"), ("logprobs", "yes", "true or false"),
])
def test_validation_names_the_field_and_range(field, value, words):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and str(e.value).startswith(field + ":") and words in str(e.value)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(SamplingError, match="top_logprobs: needs logprobs"):
        SamplingParams(top_logprobs=2)


# ---- stop strings and streaming text -------------------------------------------------------------------


def stream_all(pieces, stop):
    ts = TextStream(stop)
    out = [ts.push(p) for p in pieces]
    return out, ts


def test_stop_string_split_across_tokens_is_never_shown():
    out, ts = stream_all([b"Hello E", b"N", b"D of it"], ["END"])
    assert out == ["Hello ", "", ""] and ts.stopped_by == "END"


def test_held_text_that_does_not_become_a_stop_is_released():
    out, ts = stream_all([b"a E", b"Nx", b"y"], ["END"])
    assert out == ["a ", "ENx", "y"] and ts.stopped_by is None
    assert ts.flush() == ""
    out, ts = stream_all([b"a EN"], ["END"])
    assert out == ["a "] and ts.flush() == "EN"  # the end of the request shows what was held


def test_first_of_several_stop_strings_wins():
    out, ts = stream_all([b"one two three"], ["three", "two"])
    assert out == ["one "] and ts.stopped_by == "two"


def test_utf8_character_split_across_tokens():
    e_acute = "é".encode()
    out, ts = stream_all([b"caf" + e_acute[:1], e_acute[1:] + b"!"], [])
    assert out == ["caf", "é!"]
    ts = TextStream([])
    assert ts.push(b"\xe2\x82") == "" and ts.flush() == "\ufffd"


class ByteTokenizer:
    """A tokenizer whose token i is the byte i (256 = end of generation), for Generation tests."""

    eog_ids = frozenset({256})
    n_vocab = 257

    def piece(self, i, special=False):
        return b"" if i == 256 else bytes([i])


def one_hot(i, n=257):
    z = np.full(n, -10.0, np.float32)
    z[i] = 10.0
    return z


def run(params, script, n_ctx=1000, prompt=(1, 2)):
    g = Generation(ByteTokenizer(), params, list(prompt), n_ctx)
    steps = []
    for t in script:
        steps.append(g.push(one_hot(t)))
        if steps[-1].finish_reason:
            break
    return g, steps


def test_generation_stops_on_eog_without_text():
    g, steps = run(SamplingParams(temperature=0), [ord("h"), ord("i"), 256, ord("x")])
    assert [s.finish_reason for s in steps] == [None, None, "stop"] and g.output == "hi" and g.tokens[-1] == 256


def test_generation_stop_string_and_token_ids():
    g, steps = run(SamplingParams(temperature=0, stop=["lo w"]), b"hello world")
    assert g.output == "hel" and steps[-1].finish_reason == "stop" and len(steps) == len("hello w")
    g, steps = run(SamplingParams(temperature=0, stop_token_ids=(ord("o"),)), b"hello")
    assert g.output == "hell" and steps[-1].finish_reason == "stop"
    g, steps = run(SamplingParams(temperature=0, ignore_eos=True), [ord("a"), 256, ord("b")] + [ord("c")] * 3)
    assert g.finish_reason is None and len(steps) == 6


def test_generation_length_limits():
    g, steps = run(SamplingParams(temperature=0, max_tokens=3, stop=["zz"]), b"abz")
    assert g.output == "abz" and steps[-1].finish_reason == "length"  # held "z" is released at the end
    g, steps = run(SamplingParams(temperature=0), b"abcdef", n_ctx=5, prompt=(1, 2))
    assert g.output == "abc" and steps[-1].finish_reason == "length"  # 2 prompt + 3 generated fill n_ctx 5


# ---- on a real model --------------------------------------------------------------------------------------


@pytest.mark.realmodel
def test_greedy_chat_equals_engine_generate(smollm2_path):
    from turboprefill import Engine
    from turboprefill.chat import chat_tokens

    msgs = [{"role": "user", "content": "Name three colors."}]
    with Engine(smollm2_path, threads=2, n_ctx=512) as eng:
        want = eng.generate(chat_tokens(eng, msgs), max_new_tokens=24)
        text = eng.chat(msgs, temperature=0, max_tokens=24)
        from turboprefill.chat import steps

        got = [s.token for s in steps(eng, msgs, SamplingParams(temperature=0, max_tokens=24))]
        assert got == want
        eog = eng.tokenizer.eog_ids
        assert text == eng.detokenize([t for t in want if t not in eog])
        pieces = list(eng.chat_stream(msgs, temperature=0, max_tokens=24))
        assert "".join(pieces) == text and len(pieces) > 1
        a = eng.chat(msgs, temperature=1.0, seed=11, max_tokens=16)
        assert a == eng.chat(msgs, temperature=1.0, seed=11, max_tokens=16)
