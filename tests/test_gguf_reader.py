"""The C++ GGUF reader (csrc/gguf) seen through describe_gguf: round-trips and rejection of bad files.

Valid files come from the `gguf` package (which we did not write), so a round-trip checks our reader against
an independent writer. Broken files are hand-built with struct (little-endian, GGUF_SPEC §1) so each test
breaks exactly one rule and checks the exception type plus the message parts a user needs (what, where,
expected vs found).
"""

from __future__ import annotations

import math
import random
import struct
import time

import gguf
import numpy as np
import pytest

from turboprefill.errors import FormatError, UnsupportedError
from turboprefill.ggufinfo import describe_gguf

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

# ---- hand-built files ---------------------------------------------------------------------------------

_SCALAR_FMT = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}  # fmt: skip


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: VT, v) -> bytes:
    if vtype == VT.STRING:
        return gstr(v)
    return struct.pack(_SCALAR_FMT[vtype], v)


def kv(key: str | bytes, vtype: VT, v) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + value(vtype, v)


def kv_array(key: str, etype: VT, items) -> bytes:
    body = b"".join(value(etype, x) for x in items)
    return gstr(key) + struct.pack("<IIQ", VT.ARRAY, etype, len(items)) + body


def tinfo(name: str | bytes, ne: list[int], ttype: int, offset: int) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(ne))
        + struct.pack(f"<{len(ne)}Q", *ne)
        + struct.pack("<IQ", ttype, offset)
    )


def gguf_bytes(
    kvs: list[bytes] = (),
    tis: list[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    alignment: int = 32,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A GGUF file: header, kvs, tensor infos, zero padding to `alignment`, then `data` verbatim."""
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tis) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tis)
    body += b"\0" * ((alignment - len(body) % alignment) % alignment)
    return body + data


@pytest.fixture
def write(tmp_path):
    counter = iter(range(1_000_000))

    def _write(data: bytes) -> str:
        p = tmp_path / f"f{next(counter)}.gguf"
        p.write_bytes(data)
        return str(p)

    return _write


def describe_bytes(write, data: bytes) -> dict:
    return describe_gguf(write(data))


def small_valid_file() -> bytes:
    """Two tensors whose data ends exactly at EOF, so every shorter prefix is a truncated file."""
    kvs = [
        kv("general.architecture", VT.STRING, "llama"),
        kv("u32", VT.UINT32, 7),
        kv("f32", VT.FLOAT32, 0.5),
        kv("b", VT.BOOL, True),
        kv_array("toks", VT.STRING, ["a", "bc", ""]),
        kv_array("ids", VT.INT32, [1, -2, 3]),
    ]
    tis = [tinfo("a", [4, 2], QT.F32, 0), tinfo("b", [32], QT.Q8_0, 32)]
    data = np.arange(8, dtype=np.float32).tobytes() + b"\x01" * 34  # 'a' fills exactly 32 bytes
    return gguf_bytes(kvs, tis, data)


# ---- valid files: round-trips through an independent writer -------------------------------------------


def write_with_gguf(path, build, **kw) -> None:
    w = gguf.GGUFWriter(str(path), "llama", **kw)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SCALARS = [
    ("u8", VT.UINT8, 255),
    ("i8", VT.INT8, -128),
    ("u16", VT.UINT16, 65535),
    ("i16", VT.INT16, -32768),
    ("u32", VT.UINT32, 2**32 - 1),
    ("i32", VT.INT32, -(2**31)),
    ("u64", VT.UINT64, 2**64 - 1),
    ("i64", VT.INT64, -(2**63)),
    ("f32", VT.FLOAT32, 0.1),
    ("f64", VT.FLOAT64, 0.1),
    ("f64_big", VT.FLOAT64, 1e300),
    ("f64_int", VT.FLOAT64, 3.0),
    ("bool_t", VT.BOOL, True),
    ("bool_f", VT.BOOL, False),
    ("str", VT.STRING, 'quote" backslash\\ nl\n tab\t ctl\x01\x1f del\x7f é 漢字 🙂'),
    ("empty_str", VT.STRING, ""),
]

ARRAYS = [
    ("a_u8", VT.UINT8, [0, 1, 255]),
    ("a_i8", VT.INT8, [-128, 0, 127]),
    ("a_u16", VT.UINT16, [0, 65535]),
    ("a_i16", VT.INT16, [-32768, 32767]),
    ("a_u32", VT.UINT32, [0, 2**32 - 1]),
    ("a_i32", VT.INT32, [-(2**31), 2**31 - 1]),
    ("a_u64", VT.UINT64, [0, 2**63, 2**64 - 1]),
    ("a_i64", VT.INT64, [-(2**63), 2**63 - 1]),
    ("a_f32", VT.FLOAT32, [0.1, -2.5, 1e-30]),
    ("a_f64", VT.FLOAT64, [0.1, -1e300, 5e-324]),
    ("a_bool", VT.BOOL, [True, False, True]),
    ("a_str", VT.STRING, ["<s>", "", 'a"b\\c\n', "ünï"]),
]


def expected(vtype: VT, v):
    """What JSON should hold: F32 values are the float32 nearest v, widened exactly."""
    if vtype == VT.FLOAT32:
        return float(np.float32(v))
    return v


def test_every_metadata_type_round_trips(tmp_path):
    path = tmp_path / "all.gguf"

    def build(w):
        for key, vt, v in SCALARS:
            w.add_key_value(key, v, vt)
        for key, et, items in ARRAYS:
            w.add_key_value(key, items, VT.ARRAY, sub_type=et)

    write_with_gguf(path, build)
    md = describe_gguf(path)["metadata"]
    assert md["general.architecture"] == "llama"
    for key, vt, v in SCALARS:
        assert md[key] == expected(vt, v), key
        assert type(md[key]) is type(v), key  # bool stays bool, 3.0 stays a float, ints stay ints
    for key, et, items in ARRAYS:
        assert md[key] == [expected(et, x) for x in items], key
        assert [type(x) for x in md[key]] == [type(x) for x in items], key  # True == 1, so check types too
    assert list(md) == ["general.architecture"] + [k for k, _, _ in SCALARS] + [k for k, _, _ in ARRAYS]


@pytest.mark.parametrize("vt", [t for t in VT if t != VT.ARRAY], ids=lambda t: t.name)
def test_hand_built_scalar_and_array_of_each_type(write, vt):
    sample = {VT.STRING: "xyz", VT.BOOL: True, VT.FLOAT32: 1.25, VT.FLOAT64: -0.75}.get(vt, 42)
    md = describe_bytes(write, gguf_bytes([kv("s", vt, sample), kv_array("a", vt, [sample, sample])]))[
        "metadata"
    ]
    assert md == {"s": sample, "a": [sample, sample]}
    assert type(md["s"]) is type(sample) and {type(x) for x in md["a"]} == {type(sample)}


def test_empty_arrays(write):  # the gguf writer refuses to write these, so hand-build them
    md = describe_bytes(
        write, gguf_bytes([kv_array("e_str", VT.STRING, []), kv_array("e_f32", VT.FLOAT32, [])])
    )
    assert md["metadata"] == {"e_str": [], "e_f32": []}


def test_non_finite_floats_are_null(write):
    data = gguf_bytes(
        [
            kv("nan", VT.FLOAT32, math.nan),
            kv("inf", VT.FLOAT64, -math.inf),
            kv_array("a", VT.FLOAT32, [1.0, math.inf]),
        ]
    )
    assert describe_bytes(write, data)["metadata"] == {"nan": None, "inf": None, "a": [1.0, None]}


def test_non_utf8_bytes_pass_through(write):
    raw = b"\xff\xfe-\xc3\xa9"
    md = describe_bytes(write, gguf_bytes([gstr(raw) + struct.pack("<I", VT.STRING) + gstr(raw)]))["metadata"]
    key, val = next(iter(md.items()))
    assert key.encode("utf-8", "surrogateescape") == raw
    assert val.encode("utf-8", "surrogateescape") == raw


def test_tensor_table(tmp_path):
    path = tmp_path / "t.gguf"
    q8 = np.zeros((3, 2 * 34), dtype=np.uint8)  # 3 rows of 64 Q8_0 elements (2 blocks each)
    q4k = np.zeros((2, 144), dtype=np.uint8)  # 2 rows of 256 Q4_K elements

    def build(w):
        w.add_tensor("tok.f32", np.ones((5, 3), dtype=np.float32))
        w.add_tensor("v.f16", np.ones(7, dtype=np.float16))
        w.add_tensor("w.q8_0", q8, raw_dtype=QT.Q8_0)
        w.add_tensor("w.q4_k", q4k, raw_dtype=QT.Q4_K)
        w.add_tensor("x.3d", np.ones((2, 3, 4), dtype=np.float32))

    write_with_gguf(path, build)
    d = describe_gguf(path)
    reader = gguf.GGUFReader(str(path))  # the independent reader's view of the same file
    assert d["version"] == 3 and d["alignment"] == 32
    assert d["data_offset"] == reader.data_offset and d["data_offset"] % 32 == 0
    assert d["file_size"] == path.stat().st_size
    got = {t["name"]: t for t in d["tensors"]}
    assert [t["name"] for t in d["tensors"]] == [t.name for t in reader.tensors]
    want = {
        "tok.f32": ("F32", 0, [3, 5], 60),
        "v.f16": ("F16", 1, [7], 14),
        "w.q8_0": ("Q8_0", 8, [64, 3], 3 * 68),
        "w.q4_k": ("Q4_K", 12, [256, 2], 2 * 144),
        "x.3d": ("F32", 0, [4, 3, 2], 96),
    }
    for rt in reader.tensors:
        t = got[rt.name]
        assert (t["type"], t["type_id"], t["shape"], t["nbytes"]) == want[rt.name], rt.name
        assert t["nbytes"] == rt.n_bytes
        assert d["data_offset"] + t["offset"] == rt.data_offset, rt.name
        assert t["offset"] % 32 == 0


def test_custom_alignment(tmp_path):
    path = tmp_path / "al.gguf"

    def build(w):
        w.add_custom_alignment(64)
        w.add_tensor("a", np.ones(3, dtype=np.float32))
        w.add_tensor("b", np.ones(5, dtype=np.float32))

    write_with_gguf(path, build)
    d = describe_gguf(path)
    assert d["alignment"] == 64 and d["metadata"]["general.alignment"] == 64
    assert d["data_offset"] % 64 == 0
    assert [t["offset"] for t in d["tensors"]] == [0, 64]


def test_version_2_accepted(write):
    d = describe_bytes(
        write, gguf_bytes([kv("k", VT.UINT32, 1)], [tinfo("t", [2], QT.F32, 0)], b"\0" * 8, version=2)
    )
    assert d["version"] == 2 and d["metadata"] == {"k": 1} and d["tensors"][0]["shape"] == [2]


def test_no_tensors_no_metadata(write):
    d = describe_bytes(write, b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    assert d["metadata"] == {} and d["tensors"] == [] and d["file_size"] == 24


def test_empty_and_long_names_at_the_limit(write):
    name63 = "n" * 63
    d = describe_bytes(
        write, gguf_bytes([], [tinfo(name63, [0, 4], QT.F32, 0), tinfo("z", [1], QT.F32, 0)], b"\0" * 4)
    )
    assert [t["name"] for t in d["tensors"]] == [name63, "z"]
    assert d["tensors"][0]["nbytes"] == 0  # an empty tensor occupies no bytes, so it overlaps nothing


def test_large_token_array_is_fast(tmp_path):
    path = tmp_path / "vocab.gguf"
    toks = [f'tok{i}\n"' for i in range(262144)]

    def build(w):
        w.add_token_list(toks)
        w.add_token_scores([float(i) for i in range(262144)])

    write_with_gguf(path, build)
    t0 = time.perf_counter()
    md = describe_gguf(path)["metadata"]
    elapsed = time.perf_counter() - t0
    assert md["tokenizer.ggml.tokens"] == toks
    assert md["tokenizer.ggml.scores"][-1] == 262143.0
    # Linear work is ~0.1-0.3 s here including json.loads; a quadratic append would take minutes.
    assert elapsed < 5.0


# ---- rejected files ------------------------------------------------------------------------------------


def test_nonexistent_path_is_oserror(tmp_path):
    p = tmp_path / "missing.gguf"
    with pytest.raises(OSError, match="missing.gguf.*No such file"):
        describe_gguf(p)


def test_directory_is_oserror(tmp_path):
    with pytest.raises(OSError, match="not a regular file"):
        describe_gguf(tmp_path)


def test_wrong_magic(write):
    data = bytearray(small_valid_file())
    data[:4] = b"GGML"
    with pytest.raises(FormatError, match=r"not a GGUF file: magic at offset 0 is 47 47 4d 4c"):
        describe_bytes(write, bytes(data))


@pytest.mark.parametrize("version", [1, 4, 0x12345])
def test_unsupported_version(write, version):
    data = gguf_bytes([kv("k", VT.UINT8, 1)], version=version)
    with pytest.raises(UnsupportedError, match=f"unsupported GGUF version {version} at offset 4"):
        describe_bytes(write, data)


def test_version_0_is_format_error(write):
    with pytest.raises(FormatError, match="invalid GGUF version 0"):
        describe_bytes(write, gguf_bytes([], version=0))


def test_big_endian_rejected(tmp_path):
    path = tmp_path / "be.gguf"
    write_with_gguf(path, lambda w: w.add_uint32("k", 1), endianess=gguf.GGUFEndian.BIG)
    assert path.read_bytes()[4:8] == b"\0\0\0\3"  # really a big-endian v3 file
    with pytest.raises(UnsupportedError, match="big-endian GGUF not supported"):
        describe_gguf(path)


def test_every_truncation_is_a_format_error(write):
    full = small_valid_file()
    describe_bytes(write, full)  # the untruncated file is valid
    for cut in range(len(full)):
        with pytest.raises(FormatError) as ei:
            describe_bytes(write, full[:cut])
        msg = str(ei.value)
        assert "truncated file" in msg and f"{cut} bytes" in msg, (cut, msg)


def test_truncated_message_names_tensor_and_offsets(write):
    full = small_valid_file()
    # Cut 3 bytes into the u64 offset field of tensor info 1 ('b'), after its name, n_dims, ne[0] and type.
    field = full.index(gstr("b") + struct.pack("<I", 1)) + len(gstr("b")) + 4 + 8 + 4
    cut = field + 3
    want = rf"tensor info 1 \('b'\) needs 8 bytes at offset {field} but the file has {cut} bytes"
    with pytest.raises(FormatError, match=want):
        describe_bytes(write, full[:cut])


@pytest.mark.parametrize("n_kv", [2**62, 2**64 - 1, 1000])
def test_huge_n_kv(write, n_kv):
    with pytest.raises(FormatError, match=f"n_kv = {n_kv}"):
        describe_bytes(write, gguf_bytes([kv("k", VT.UINT8, 1)], n_kv=n_kv))


def test_huge_n_tensors(write):
    with pytest.raises(FormatError, match=f"n_tensors = {2**62}"):
        describe_bytes(write, gguf_bytes([kv("k", VT.UINT8, 1)], n_tensors=2**62))


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 100])
def test_huge_key_length(write, length):
    bad = struct.pack("<Q", length) + b"key" + struct.pack("<IB", VT.UINT8, 1)
    with pytest.raises(FormatError, match=f"key-value pair 0 key needs {length} bytes at offset 32"):
        describe_bytes(write, gguf_bytes([bad]))


def test_huge_string_value_length(write):
    bad = gstr("k") + struct.pack("<IQ", VT.STRING, 2**63) + b"abc"
    with pytest.raises(FormatError, match=f"key 'k' value needs {2**63} bytes"):
        describe_bytes(write, gguf_bytes([bad]))


def test_huge_string_in_array(write):
    bad = gstr("toks") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2) + gstr("ok") + struct.pack("<Q", 2**63)
    with pytest.raises(FormatError, match=f"key 'toks' array element 1 needs {2**63} bytes"):
        describe_bytes(write, gguf_bytes([bad]))


@pytest.mark.parametrize("etype", [VT.UINT8, VT.STRING, VT.FLOAT64, VT.BOOL])
@pytest.mark.parametrize("count", [2**62, 2**64 - 1, 10_000])
def test_huge_array_count(write, etype, count):
    bad = gstr("arr") + struct.pack("<IIQ", VT.ARRAY, etype, count) + b"\0" * 16
    name = {VT.UINT8: "U8", VT.STRING: "STRING", VT.FLOAT64: "F64", VT.BOOL: "BOOL"}[etype]
    with pytest.raises(FormatError, match=f"key 'arr' declares {count} {name} array elements"):
        describe_bytes(write, gguf_bytes([bad]))


def test_nested_array(write):
    bad = gstr("nest") + struct.pack("<IIQ", VT.ARRAY, VT.ARRAY, 1) + struct.pack("<IQ", VT.UINT8, 1) + b"\1"
    with pytest.raises(FormatError, match="key 'nest' is a nested array"):
        describe_bytes(write, gguf_bytes([bad]))


@pytest.mark.parametrize("vtype", [13, 0xFFFFFFFF])
def test_unknown_value_type(write, vtype):
    bad = gstr("k") + struct.pack("<I", vtype) + b"\0" * 8
    with pytest.raises(FormatError, match=f"key 'k' has unknown value type {vtype} at offset"):
        describe_bytes(write, gguf_bytes([bad]))


def test_bool_other_than_0_or_1(write):
    bad = gstr("flag") + struct.pack("<IB", VT.BOOL, 2)
    with pytest.raises(FormatError, match="key 'flag' has BOOL value 2"):
        describe_bytes(write, gguf_bytes([bad]))


def test_duplicate_key(write):
    with pytest.raises(FormatError, match="duplicate key 'k' \\(key-value pair 1"):
        describe_bytes(write, gguf_bytes([kv("k", VT.UINT8, 1), kv("k", VT.UINT16, 2)]))


def test_empty_key(write):
    with pytest.raises(FormatError, match="key-value pair 0 has an empty key"):
        describe_bytes(write, gguf_bytes([kv("", VT.UINT8, 1)]))


@pytest.mark.parametrize(
    "vtype, val, msg",
    [
        (VT.UINT64, 32, "has type U64, expected U32"),
        (VT.INT32, 32, "has type I32, expected U32"),
        (VT.UINT32, 0, "is 0, expected a non-zero power of two"),
        (VT.UINT32, 48, "is 48, expected a non-zero power of two"),
    ],
)
def test_bad_alignment(write, vtype, val, msg):
    with pytest.raises(FormatError, match=f"key 'general.alignment' {msg}"):
        describe_bytes(write, gguf_bytes([kv("general.alignment", vtype, val)]))


def test_misaligned_tensor_offset(write):
    data = gguf_bytes([], [tinfo("t", [4], QT.F32, 16)], b"\0" * 64)
    with pytest.raises(FormatError, match="tensor 't' offset 16 is not a multiple of the alignment 32"):
        describe_bytes(write, data)


def test_tensor_data_past_eof(write):
    data = gguf_bytes([], [tinfo("w", [16], QT.F32, 32)], b"\0" * 80)
    size = len(data)
    with pytest.raises(
        FormatError, match=f"truncated file: tensor 'w' data needs 64 bytes .* file has {size} bytes"
    ):
        describe_bytes(write, data)


def test_tensor_offset_beyond_eof_with_huge_value(write):
    data = gguf_bytes([], [tinfo("w", [4], QT.F32, 2**64 - 32)], b"\0" * 16)
    with pytest.raises(FormatError, match="tensor 'w' data needs 16 bytes"):
        describe_bytes(write, data)


def test_overlapping_tensors(write):
    data = gguf_bytes([], [tinfo("a", [16], QT.F32, 0), tinfo("b", [8], QT.F32, 32)], b"\0" * 64)
    with pytest.raises(FormatError, match=r"tensors 'a' \(data offset 0, 64 bytes\) and 'b' .* overlap"):
        describe_bytes(write, data)


def test_adjacent_tensors_do_not_overlap(write):
    d = describe_bytes(
        write, gguf_bytes([], [tinfo("b", [8], QT.F32, 64), tinfo("a", [16], QT.F32, 0)], b"\0" * 96)
    )
    assert [(t["name"], t["offset"], t["nbytes"]) for t in d["tensors"]] == [("b", 64, 32), ("a", 0, 64)]


def test_duplicate_tensor_name(write):
    data = gguf_bytes([], [tinfo("w", [8], QT.F32, 0), tinfo("w", [8], QT.F32, 32)], b"\0" * 64)
    with pytest.raises(FormatError, match=r"duplicate tensor name 'w' \(tensor info 1"):
        describe_bytes(write, data)


def test_tensor_name_too_long(write):
    data = gguf_bytes([], [tinfo("n" * 64, [8], QT.F32, 0)], b"\0" * 32)
    with pytest.raises(FormatError, match="name is 64 bytes, the limit is 63"):
        describe_bytes(write, data)


@pytest.mark.parametrize("ne", [[], [1, 1, 1, 1, 1]], ids=["n_dims0", "n_dims5"])
def test_bad_n_dims(write, ne):
    data = gguf_bytes([], [tinfo("w", ne, QT.F32, 0)], b"\0" * 32)
    with pytest.raises(FormatError, match=f"tensor 'w' has n_dims = {len(ne)} at offset \\d+, expected 1..4"):
        describe_bytes(write, data)


def test_negative_ne(write):
    data = gguf_bytes([], [tinfo("w", [4, 2**64 - 1], QT.F32, 0)], b"\0" * 32)
    with pytest.raises(FormatError, match=r"tensor 'w' has ne\[1\] = -1 .*expected >= 0"):
        describe_bytes(write, data)


def test_element_count_overflow(write):
    data = gguf_bytes([], [tinfo("w", [2**32, 2**32], QT.F32, 0)], b"\0" * 32)
    with pytest.raises(FormatError, match="element count overflows int64"):
        describe_bytes(write, data)


@pytest.mark.parametrize("ttype, ne0, block", [(QT.Q8_0, 48, 32), (QT.Q4_K, 128, 256), (QT.Q6_K, 300, 256)])
def test_row_not_whole_blocks(write, ttype, ne0, block):
    data = gguf_bytes([], [tinfo("w", [ne0, 2], ttype, 0)], b"\0" * 4096)
    with pytest.raises(
        FormatError, match=f"ne\\[0\\] = {ne0}, which is not a multiple of the block size {block}"
    ):
        describe_bytes(write, data)


@pytest.mark.parametrize("type_id", [4, 5, 16, 99, 2**31, 2**32 - 1])
def test_unsupported_tensor_type(write, type_id):
    data = gguf_bytes([], [tinfo("blk.0.w", [256], type_id, 0)], b"\0" * 1024)
    with pytest.raises(UnsupportedError, match=f"unsupported tensor type id {type_id} in tensor 'blk.0.w'"):
        describe_bytes(write, data)


def test_random_corruption_never_crashes(write):
    """Byte flips and cuts of a valid file: each result is a clean parse or a FormatError/UnsupportedError."""
    full = small_valid_file()
    rng = random.Random(1234)
    outcomes = {"ok": 0, "format": 0, "unsupported": 0}
    for _ in range(400):
        b = bytearray(full)
        for _ in range(rng.randint(1, 4)):
            p = rng.randrange(len(b))
            b[p] = rng.choice([rng.randrange(256), b[p] ^ (1 << rng.randrange(8)), 0xFF])
        if rng.random() < 0.3:
            b = b[: rng.randrange(len(b) + 1)]
        try:
            describe_bytes(write, bytes(b))
            outcomes["ok"] += 1
        except FormatError:
            outcomes["format"] += 1
        except UnsupportedError:
            outcomes["unsupported"] += 1
    assert outcomes["format"] > 100  # the mutations really do break files
