"""Search spaces, one module each; an experiment names one with `search_space = "<module>"`.

Each module defines `SPACE` (a `cnnopt.experiment.space.Space`) and says in its docstring which hyperparameters
are scientific (what the study is for), nuisance (tuned so the comparison is fair) and fixed.
"""

from __future__ import annotations

import importlib
import pkgutil

from cnnopt.errors import UsageError
from cnnopt.experiment.space import Space


def names() -> list[str]:
    """Every registered space, found by module name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> Space:
    """The space declared in `search_spaces/<name>.py`."""
    if name not in names():
        raise UsageError(f"unknown search space {name!r}; available: {', '.join(names())} (see --list-spaces)")
    return importlib.import_module(f"{__name__}.{name}").SPACE


def source_path(name: str) -> str:
    """The module file, logged with every study so the space can be reproduced from the run."""
    return importlib.import_module(f"{__name__}.{name}").__file__
