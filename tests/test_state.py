"""Prefix cache: Engine.save_state / load_state. A saved and loaded state must give the next tokens the
same logits, bit for bit, as one engine that prefilled everything; a state of another model or layer
split, or a damaged file, must be refused without touching the engine's sequence."""

from __future__ import annotations

import numpy as np
import pytest

from turboprefill import Engine, FormatError

from conftest import SYNTHETIC


def prompt(n: int, n_vocab: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt-oss"])
@pytest.mark.parametrize("stages", [1, 2])
def test_saved_state_continues_bit_identically(synthetic_model, tmp_path, name, stages):
    path = synthetic_model(name)
    n_vocab = SYNTHETIC[name][1]["n_vocab"]
    a, b = prompt(37, n_vocab, 1), prompt(29, n_vocab, 2)
    devices = ",".join(f"cpu:{i}" for i in range(stages))

    whole = Engine(path, devices=devices, threads=1, ubatch=8)
    whole.prefill(a)
    ref = whole.prefill(b, all_logits=True).logits

    first = Engine(path, devices=devices, threads=1, ubatch=8)
    first.prefill(a)
    state = tmp_path / "a.tpkv"
    first.save_state(state)
    first.close()

    fresh = Engine(path, devices=devices, threads=1, ubatch=5)  # another ubatch: results do not depend on it
    fresh.load_state(state)
    assert fresh.n_past == len(a)
    got = fresh.prefill(b, all_logits=True).logits
    assert np.array_equal(got, ref)
    assert fresh.kv_digest() == whole.kv_digest()


def test_load_replaces_the_sequence_and_empty_state_loads(synthetic_model, tmp_path):
    path = synthetic_model("llama")
    eng = Engine(path, threads=1)
    empty = tmp_path / "empty.tpkv"
    eng.save_state(empty)
    eng.prefill(prompt(10, 300, 3))
    eng.load_state(empty)
    assert eng.n_past == 0
    ref = Engine(path, threads=1).prefill(prompt(12, 300, 4)).logits
    assert np.array_equal(eng.prefill(prompt(12, 300, 4)).logits, ref)


def test_other_model_or_split_is_refused(synthetic_model, tmp_path):
    state = tmp_path / "s.tpkv"
    src = Engine(synthetic_model("llama"), devices="cpu:0,cpu:1", threads=1, layer_split=[1, 3])
    src.prefill(prompt(9, 300, 5))
    src.save_state(state)

    other_split = Engine(synthetic_model("llama"), devices="cpu:0,cpu:1", threads=1, layer_split=[2, 2])
    with pytest.raises(ValueError, match=r"layer_split=\[1, 3\]"):
        other_split.load_state(state)
    assert other_split.n_past == 0
    one_stage = Engine(synthetic_model("llama"), threads=1)
    with pytest.raises(ValueError, match="layer_split"):
        one_stage.load_state(state)
    other_model = Engine(synthetic_model("qwen2"), devices="cpu:0,cpu:1", threads=1, layer_split=[1, 3])
    with pytest.raises(ValueError, match="another model"):
        other_model.load_state(state)


def test_damaged_files_are_refused_and_keep_the_sequence(synthetic_model, tmp_path):
    path = synthetic_model("llama")
    src = Engine(path, threads=1)
    src.prefill(prompt(20, 300, 6))
    state = tmp_path / "s.tpkv"
    src.save_state(state)
    raw = state.read_bytes()

    eng = Engine(path, threads=1)
    eng.prefill(prompt(3, 300, 7))
    digest = eng.kv_digest()
    truncated = tmp_path / "t.tpkv"
    truncated.write_bytes(raw[:-100])
    with pytest.raises(FormatError, match="truncated"):
        eng.load_state(truncated)
    corrupt = tmp_path / "c.tpkv"
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x40
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(FormatError, match="checksum"):
        eng.load_state(corrupt)
    junk = tmp_path / "j.tpkv"
    junk.write_bytes(b"not a state at all")
    with pytest.raises(FormatError, match="not a turboprefill state"):
        eng.load_state(junk)
    with pytest.raises(OSError, match="cannot open"):
        eng.load_state(tmp_path / "missing.tpkv")
    assert eng.n_past == 3 and eng.kv_digest() == digest


def test_state_larger_than_context_is_refused(synthetic_model, tmp_path):
    path = synthetic_model("llama")
    src = Engine(path, threads=1)
    src.prefill(prompt(40, 300, 8))
    state = tmp_path / "s.tpkv"
    src.save_state(state)
    small = Engine(path, threads=1, n_ctx=32)
    with pytest.raises(ValueError, match="n_ctx >= 40"):
        small.load_state(state)
