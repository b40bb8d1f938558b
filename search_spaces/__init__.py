"""Search spaces, one module each; an experiment names one with `search_space = "<module>"`.

Each module defines `SPACE` (a `cnnopt.experiment.space.Space`) and says in its docstring which hyperparameters
are scientific (what the study is for), nuisance (tuned so the comparison is fair) and fixed.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from cnnopt.errors import UsageError, last_line
from cnnopt.experiment.space import Space


def names() -> list[str]:
    """Every registered space, found by module name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> Space:
    """The space declared in `search_spaces/<name>.py`; a module that does not load, or declares no Space of its
    own name, is one line naming the file (it was a traceback, after the study's first line)."""
    if name not in names():
        raise UsageError(f"unknown search space {name!r}; available: {', '.join(names())} (see --list-spaces)")
    where = f"search_spaces/{name}.py"
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except UsageError as exc:  # the Space's own checks (`space.validate`), as it was declared
        raise UsageError(f"{where}: {exc}") from None
    except (Exception, SystemExit) as exc:  # a syntax error, a failed import, a bad argument, an exit: its own code
        detail = (f"{Path(exc.filename or where).name} line {exc.lineno}: {exc.msg}" if isinstance(exc, SyntaxError)
                  else last_line(exc) if str(exc) else type(exc).__name__)
        raise UsageError(f"{where} cannot be loaded ({type(exc).__name__}: {detail}); fix the file") from None
    space = getattr(module, "SPACE", None)
    if not isinstance(space, Space):
        raise UsageError(f"{where} defines no SPACE = Space(...) (found {type(space).__name__}); declare one")
    if space.name != name:  # the name a study records and a resume looks the module up by
        raise UsageError(f"{where} declares Space(name={space.name!r}); name it {name!r}, after its file")
    return space


def source_path(name: str) -> str:
    """The module file, logged with every study so the space can be reproduced from the run."""
    return importlib.import_module(f"{__name__}.{name}").__file__
