"""A missing optional package is one line naming the extra to install, never a traceback.

Packages are hidden by putting None in sys.modules (what Python itself does to block an import: the import
then raises ModuleNotFoundError with .name set, exactly like an uninstalled package), restored after each test.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from turboprefill import Engine, MissingDependencyError, cli
from turboprefill._optional import optional, require
from turboprefill.bench import sweep

PLOTS_HINT = "plots need `pip install 'turboprefill[bench]'` (or pass --no-plots)"


def hide(monkeypatch, *modules: str) -> None:
    """Make `import m` fail with ModuleNotFoundError for each module and its submodules."""
    import sys

    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.setitem(sys.modules, name, None)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def run_cli(argv: list[str]) -> tuple[int, str, str, str]:
    """(exit status, stdout, stderr, both interleaved in the order written)."""
    out, err, both = io.StringIO(), io.StringIO(), io.StringIO()

    class Tee(io.TextIOBase):
        def __init__(self, own):
            self.own = own

        def write(self, s):
            self.own.write(s)
            both.write(s)
            return len(s)

    with contextlib.redirect_stdout(Tee(out)), contextlib.redirect_stderr(Tee(err)):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue(), both.getvalue()


def test_require_names_the_extra_and_is_an_import_error(monkeypatch):
    hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError) as ei:
        require("matplotlib.pyplot", "the plots")
    e = ei.value
    assert isinstance(e, ImportError) and e.extra == "bench" and e.name == "matplotlib.pyplot"
    assert str(e) == "the plots needs the matplotlib package: `pip install 'turboprefill[bench]'`"
    assert isinstance(e.__cause__, ModuleNotFoundError)  # the original error stays available for debugging
    assert optional("matplotlib") is None


def test_require_names_a_dependency_of_the_optional_package(monkeypatch):
    # matplotlib present but one of its own imports missing: still the extra, plus what is actually missing
    def broken(name, *a, **k):
        raise ModuleNotFoundError("No module named 'kiwisolver'", name="kiwisolver")

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(MissingDependencyError, match=r"turboprefill\[bench\].*kiwisolver, which matplotlib"):
        require("matplotlib", "plots")


def test_trace_plot_without_matplotlib(monkeypatch, synthetic_model, tmp_path):
    res = Engine(synthetic_model("llama"), devices="cpu", threads=1, ubatch=8).prefill(list(range(20)))
    hide(monkeypatch, "matplotlib")
    with pytest.raises(
        MissingDependencyError,
        match=r"^Trace\.plot\(\) needs the matplotlib package: "
        r"`pip install 'turboprefill\[bench\]'`$",
    ):
        res.trace.plot(tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


BENCH = ["bench", "--ctx", "24", "--ubatch", "8", "--devices", "cpu", "--repeat", "1", "--quiet"]


def test_bench_without_matplotlib_prints_table_then_one_line(monkeypatch, synthetic_model, tmp_path):
    hide(monkeypatch, "matplotlib")
    rc, out, err, both = run_cli([*BENCH, str(synthetic_model("llama")), "--out", str(tmp_path)])
    assert rc == 1
    assert err == f"turboprefill: {PLOTS_HINT}\n"  # one line, no traceback
    assert "| devices |" in out and both.index("| devices |") < both.index(PLOTS_HINT)  # the sweep is not lost
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["schedule"] for r in rows} == {"sequential", "pipelined"}
    assert not list(tmp_path.glob("*.png"))


def test_bench_no_plots_needs_no_matplotlib(monkeypatch, synthetic_model, tmp_path):
    hide(monkeypatch, "matplotlib")
    rc, out, err, _ = run_cli([*BENCH, str(synthetic_model("llama")), "--out", str(tmp_path), "--no-plots"])
    assert (rc, err) == (0, "") and "| devices |" in out


def test_bench_with_matplotlib_writes_plots(synthetic_model, tmp_path):
    pytest.importorskip("matplotlib")
    rc, out, err, _ = run_cli([*BENCH, str(synthetic_model("llama")), "--out", str(tmp_path)])
    assert (rc, err) == (0, "")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["gain_vs_ubatch.png", "tok_s_vs_ctx.png"]


def test_sweep_without_tqdm_logs_plain_lines(monkeypatch, synthetic_model):
    hide(monkeypatch, "tqdm")
    lines: list[str] = []
    rows = sweep(
        str(synthetic_model("llama")),
        ctxs=[16],
        ubatches=[8],
        devices_list=["cpu"],
        repeat=1,
        progress=True,
        log=lines.append,
    )
    assert len(rows) == 2 and len(lines) == 1 and "gain" in lines[0]


def test_selftest_without_gguf_is_one_line(monkeypatch):
    hide(monkeypatch, "gguf")
    rc, out, err, _ = run_cli(["selftest", "--quick"])
    assert rc == 2 and out == ""
    assert err == (
        "turboprefill: error: selftest (it writes a small synthetic model) needs the gguf package: "
        "`pip install 'turboprefill[test]'`\n"
    )


def test_missing_required_module_is_one_line(monkeypatch, smollm2_path):
    # A broken install (a required package gone) is still one line naming the package, not a traceback.
    hide(monkeypatch, "tokenizers")
    rc, out, err, _ = run_cli(["prefill", str(smollm2_path), "--prompt", "Hello", "--threads", "1"])
    assert rc == 2 and out == ""
    assert err == (
        "turboprefill: error: missing Python module 'tokenizers': `pip install tokenizers` "
        "(or reinstall turboprefill)\n"
    )
