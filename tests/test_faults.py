"""Faults from outside the engine end in a clear error and leave the engine usable (issue #14)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from turboprefill import Engine


def test_model_file_truncated_after_load_is_an_error_not_sigbus(synthetic_model, tmp_path):
    # Weights are views of the file's mapping: without the check, reading past the new end is SIGBUS, which
    # kills the whole Python process.
    path = tmp_path / "m.gguf"
    shutil.copy(synthetic_model("llama"), path)
    eng = Engine(path, devices="cpu", threads=1, ubatch=8)
    toks = list(range(20))
    ref = eng.prefill(toks).logits
    eng.reset()
    data = path.read_bytes()
    os.truncate(path, len(data) // 2)
    with pytest.raises(OSError, match=rf"shrank from {len(data)} to {len(data) // 2} bytes since it was loaded"):
        eng.prefill(toks)
    assert eng.n_past == 0  # the sequence is left as it was
    path.write_bytes(data)  # restored in place: the same inode, so the engine's mapping sees it again
    np.testing.assert_array_equal(eng.prefill(toks).logits, ref)
