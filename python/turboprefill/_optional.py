"""Optional dependencies: import one, or raise MissingDependencyError naming the extra that installs it.

`pip install turboprefill` brings only what a prefill needs (numpy, cffi, the tokenizer packages). Plots,
progress bars and the synthetic-model writer use packages from the extras in pyproject.toml; when one is
missing the user gets a single line saying which extra to install, never a ModuleNotFoundError traceback
(the CLI prints MissingDependencyError like every other TurboPrefillError).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# Top-level module -> the extra in pyproject.toml ([project.optional-dependencies]) that installs it.
EXTRAS = {"matplotlib": "bench", "tqdm": "bench", "gguf": "test", "PIL": "vision", "jinja2": "vision",
          "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve"}


def install_hint(module: str) -> str:
    """The pip command that installs ``module`` (its extra when it has one)."""
    top = module.split(".", 1)[0]
    extra = EXTRAS.get(top)
    return f"pip install 'turboprefill[{extra}]'" if extra else f"pip install {top}"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``; if it (or a package it needs) is missing, raise MissingDependencyError saying that
    ``purpose`` (e.g. "Trace.plot()") needs it and how to install it. The ImportError is chained."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # e.name is the module that was not found: usually `module` itself, sometimes one of its own deps.
        top = module.split(".", 1)[0]
        missing = getattr(e, "name", None) or module
        also = "" if missing.split(".", 1)[0] == top else f" ({missing}, which {top} imports, is missing)"
        raise MissingDependencyError(
            f"{purpose} needs the {top} package: `{install_hint(module)}`{also}",
            module=module,
            extra=EXTRAS.get(module.split(".", 1)[0]),
        ) from e


def optional(module: str) -> ModuleType | None:
    """Import ``module`` or return None: for niceties that have a plain fallback (tqdm's progress bar)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def pyplot(purpose: str) -> ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend (we only save files), or MissingDependencyError."""
    matplotlib = require("matplotlib", purpose)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", purpose)
