"""gpt-oss (mixture of experts) on the CPU engine: against llama.cpp and the float64 reference, the grouped
expert product's exactness, every expert weight type, the routing statistic, and bad files.

Oracles: llama.cpp's logits stored by scripts/make_gptoss_fixtures.py (tests/fixtures/logits_gptoss-*) and
tests/reference_moe.py (float64, weights decoded by the `gguf` package). The engine's own consistency
(ubatch sizes, threads, split calls, stages) is checked bit for bit: every expert row is computed by the
same kernel sequence whichever tokens share its grouped call (csrc/backend/cpu/moe.cpp).
"""

from __future__ import annotations

import functools
import json
import struct

import gguf
import numpy as np
import pytest
import reference_moe as R

from turboprefill import Engine
from turboprefill.errors import FormatError
from turboprefill.writer import write_model

from conftest import SYNTHETIC


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def prompt(n: int, n_vocab: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


@functools.cache
def _fixture_model(fixtures_dir, tmp_root, name: str):
    meta = json.loads((fixtures_dir / f"logits_gptoss-{name}.json").read_text())
    z = np.load(fixtures_dir / f"logits_gptoss-{name}.npz")
    path = tmp_root / f"gptoss-{name}.gguf"
    write_model(path, meta["arch"], **meta["writer_kwargs"])
    return path, z["tokens"].astype(np.int32), z["logits_tail_f16"].astype(np.float64)


@pytest.fixture(scope="module")
def fixture_model(fixtures_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gptoss-engine")
    return lambda name: _fixture_model(fixtures_dir, root, name)


# ---- accuracy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B"])
def test_matches_llama_cpp_and_reference(fixture_model, name):
    """1100 tokens (past the 128-token window), two pipelined stages. Thresholds: llama.cpp (int8
    activations, f16 KV cache) agrees with the exact float64 reference at 0.99991 on the last token and
    ≥ 0.9998 in the median of the last 32 (test_gptoss_reference.py); we measured 0.99991 / 0.99992 against
    llama.cpp and 0.999999995 against the reference (two-stage int8 activations track f32). A missing sink
    or window costs ≥ 0.0004 of median cosine, a wrong expert choice far more."""
    path, tokens, tail = fixture_model(name)
    eng = Engine(path, devices="cpu:0,cpu:1", threads=1, ubatch=64)
    got = eng.prefill(tokens, all_logits=True).logits[-len(tail) :]
    cos_llama = [_cos(g, t) for g, t in zip(got, tail)]
    assert cos_llama[-1] >= 0.999
    assert float(np.median(cos_llama)) >= 0.9998
    assert int(tail[-1].argmax()) in np.argsort(got[-1])[::-1][:5]
    ref = R.load_gptoss_model(path).forward(tokens)
    assert _cos(got[-1], ref) >= 0.99999
    assert int(got[-1].argmax()) == int(ref.argmax())


@pytest.mark.parametrize("expert_quant", ["mxfp4", "q4_k", "q5_0", "q8_0", "f16", "f32"])
def test_every_expert_weight_type_matches_reference(tmp_path, expert_quant):
    """n_embd 256 so the K-quant experts keep Q4_K; F16/F32 experts take the float grouped path."""
    path = tmp_path / "m.gguf"
    write_model(
        path,
        "gpt-oss",
        n_embd=256,
        n_head=4,
        n_head_kv=2,
        n_expert=8,
        n_expert_used=4,
        n_ff_exp=128,
        n_layer=2,
        n_vocab=128,
        quant="q8_0",
        expert_quant=expert_quant,
        sliding_window=8,
    )
    toks = prompt(40, 128, seed=4)
    ref = R.load_gptoss_model(path).forward(toks, all_logits=True)
    got = Engine(path, threads=2, ubatch=16).prefill(toks, all_logits=True).logits
    # 3e-4: twice the two-stage int8 path's worst measured error on the dense models (test_engine.py).
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 3e-4


# ---- exactness of the grouped expert product -------------------------------------------------------------


def test_results_independent_of_ubatch_threads_stages_and_split_calls(synthetic_model):
    """A ubatch of 1 sends each expert one token; of 512, dozens. The grouped product must give every row
    the same bits regardless, and so must threads, stage boundaries and splitting the prompt."""
    path = synthetic_model("gpt-oss")
    toks = prompt(150, SYNTHETIC["gpt-oss"][1]["n_vocab"], seed=5)
    base = Engine(path, threads=1, ubatch=512).prefill(toks, all_logits=True).logits
    for devices, ub, th in [("cpu", 1, 2), ("cpu", 7, 2), ("cpu", 64, 1), ("cpu:0,cpu:1,cpu:2", 33, 1)]:
        got = Engine(path, devices=devices, threads=th, ubatch=ub).prefill(toks, all_logits=True).logits
        assert np.array_equal(got, base), (devices, ub, th)
    eng = Engine(path, threads=2, ubatch=16)
    a = eng.prefill(toks[:61], all_logits=True).logits
    b = eng.prefill(toks[61:], all_logits=True).logits
    assert np.array_equal(np.concatenate([a, b]), base)


def test_experts_per_ubatch_statistic(synthetic_model):
    """With one token per ubatch every step touches exactly k distinct experts; a long ubatch touches more,
    at most all of them. Dense models report None."""
    path = synthetic_model("gpt-oss")
    _, kw = SYNTHETIC["gpt-oss"]
    toks = prompt(64, kw["n_vocab"], seed=6)
    one = Engine(path, ubatch=1).prefill(toks).stats["experts_per_ubatch"]
    assert one == kw["n_expert_used"]
    many = Engine(path, ubatch=64).prefill(toks).stats["experts_per_ubatch"]
    assert kw["n_expert_used"] < many <= kw["n_expert"]
    assert Engine(synthetic_model("llama"), ubatch=8).prefill(toks[:9]).stats["experts_per_ubatch"] is None


def test_config_reports_the_moe_features(synthetic_model):
    cfg = Engine(synthetic_model("gpt-oss")).config
    _, kw = SYNTHETIC["gpt-oss"]
    assert (cfg["architecture"], cfg["n_expert"], cfg["n_expert_used"], cfg["n_ff_exp"]) == (
        "gpt-oss", kw["n_expert"], kw["n_expert_used"], kw["n_ff_exp"])  # fmt: skip
    assert (cfg["n_swa"], cfg["n_swa_layers"], cfg["attn_sinks"], cfg["rope_scaling"]) == (16, 2, True, "yarn")


# ---- bad files -------------------------------------------------------------------------------------------


def _rewrite(src, dst, *, drop=(), kv=None, tensors=None):
    """Copy a GGUF with keys overridden (kv: key -> int), tensors dropped or replaced (name -> array)."""
    reader = gguf.GGUFReader(str(src))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if kv and key in kv:
            w.add_uint32(key, kv[key])
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            vals = [bytes(field.parts[i]).decode() if sub == gguf.GGUFValueType.STRING else field.parts[i][0]
                    for i in field.data]  # fmt: skip
            w.add_array(key, vals)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(key, bytes(field.parts[field.data[0]]).decode())
        else:
            w.add_key_value(key, field.parts[field.data[0]][0], vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if tensors and t.name in tensors:
            w.add_tensor(t.name, tensors[t.name])
            continue
        shape = [int(x) for x in reversed(t.shape)]
        data = np.asarray(t.data)
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, data.reshape(shape))
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(kv={"gpt-oss.expert_used_count": 9}), r"expert_used_count 9 must be in \[1, expert_count 8\]"),
        (dict(kv={"gpt-oss.expert_used_count": 0}), r"expert_used_count 0 must be in \[1, expert_count 8\]"),
        (dict(drop=("blk.1.attn_sinks.weight",)), r"missing tensor 'blk\.1\.attn_sinks\.weight'"),
        (dict(drop=("blk.0.ffn_up_exps.bias",)), r"missing tensor 'blk\.0\.ffn_up_exps\.bias'"),
        (dict(drop=("blk.0.attn_output.bias",)), r"missing tensor 'blk\.0\.attn_output\.bias'"),
        (dict(tensors={"blk.0.ffn_down_exps.weight": np.zeros((7, 160, 96), np.float32)}),
         r"'blk\.0\.ffn_down_exps\.weight' has shape \[96, 160, 7, 1\], expected \[96, 160, 8\]"),
        (dict(tensors={"blk.0.ffn_gate_exps.bias": np.zeros((7, 96), np.float32)}),
         r"'blk\.0\.ffn_gate_exps\.bias' has shape \[96, 7, 1, 1\], expected \[96, 8\]"),
    ],
)  # fmt: skip
def test_bad_moe_files_name_the_key_or_tensor(synthetic_model, tmp_path, change, message):
    bad = _rewrite(synthetic_model("gpt-oss", quant="f32"), tmp_path / "bad.gguf", **change)
    with pytest.raises(FormatError, match=message):
        Engine(bad)


def test_mxfp4_row_not_a_multiple_of_32_is_refused(synthetic_model, tmp_path):
    """An MXFP4 tensor whose row length is not whole 32-element blocks is refused by the reader, naming the
    tensor (the `gguf` package will not write one, so the tensor table entry is patched in place)."""
    data = bytearray(synthetic_model("gpt-oss", quant="mxfp4").read_bytes())
    name = b"blk.0.ffn_gate_exps.weight"
    at = data.index(name) + len(name)  # then: n_dims u32, ne0 u64
    assert struct.unpack_from("<IQ", data, at) == (3, 160)
    struct.pack_into("<Q", data, at + 4, 150)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(
        FormatError,
        match=r"'blk\.0\.ffn_gate_exps\.weight' has type MXFP4 with ne\[0\] = 150, "
        r"which is not a multiple of the block size 32",
    ):
        Engine(bad)
