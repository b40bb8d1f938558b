"""Search spaces declared once as plain data; every strategy derives its space from that declaration.

A space is a list of parameters, each named after a `[train]` field:
    Float("lr", 1e-3, 0.3, log=True)
    Int("blocks", 1, 3)
    Choice("optimizer", ("sgd", "adam"))
    Float("momentum", 0.8, 0.99, when={"optimizer": ("sgd",)})   # sampled only for sgd
Grid values default to the ends and middle of a range (geometric middle on a log scale) and to every
choice; `grid=(...)` states them explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import optuna

from cnnopt.experiment.config import TrainConfig, field_types
from cnnopt.errors import UsageError

GRID_LIMIT = 100_000  # grid points a space may have (built in ~0.6 s); a grid search runs at most that many trials


@dataclass(frozen=True)
class Param:
    name: str
    when: dict[str, tuple] = field(default_factory=dict, kw_only=True)  # sampled only if these hold
    grid: tuple = field(default=(), kw_only=True)

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(name) in allowed for name, allowed in self.when.items())

    def contains(self, value: Any) -> bool:
        raise NotImplementedError

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution `suggest` samples from (what a sampler is told a recorded trial used)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Float(Param):
    low: float = 0.0
    high: float = 1.0
    log: bool = field(default=False, kw_only=True)

    def suggest(self, trial) -> float:
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def grid_values(self) -> tuple:
        middle = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return self.grid or (self.low, middle, self.high)


@dataclass(frozen=True)
class Int(Param):
    low: int = 0
    high: int = 1
    log: bool = field(default=False, kw_only=True)

    def suggest(self, trial) -> int:
        return trial.suggest_int(self.name, self.low, self.high, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:  # 15.0 too: an Int on a float setting trains (and records) floats
        whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
        return whole and not isinstance(value, bool) and self.low <= value <= self.high

    def grid_values(self) -> tuple:
        middle = round(math.sqrt(self.low * self.high)) if self.log else (self.low + self.high) // 2
        return self.grid or tuple(sorted({self.low, middle, self.high}))


@dataclass(frozen=True)
class Choice(Param):
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        return trial.suggest_categorical(self.name, list(self.choices))

    def distribution(self) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.CategoricalDistribution(list(self.choices))

    def contains(self, value: Any) -> bool:
        return value in self.choices

    def grid_values(self) -> tuple:
        return self.grid or self.choices


@dataclass(frozen=True)
class Space:
    """A named search space: its parameters in sampling order, and the module's docstring."""

    name: str
    params: tuple[Param, ...]
    description: str = ""

    def __post_init__(self):
        validate(self)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def sample(self, trial) -> dict[str, Any]:
        """Define-by-run sampling for Optuna: conditional parameters only where their condition holds."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return values

    def mismatch(self, values: dict[str, Any]) -> str | None:
        """Why `values` is not a point this space can sample (None if it is): what a resume checks
        before rerunning a trial recorded under an older version of the space module."""
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            return f"{', '.join(unknown)} no longer in search space {self.name!r}"
        for param in self.params:
            if not param.active(values):
                if param.name in values:
                    return f"{param.name} is set though its condition {param.when} does not hold"
            elif param.name not in values:
                return f"{param.name} is missing"
            elif not param.contains(values[param.name]):
                return f"{param.name}={values[param.name]!r} is outside search space {self.name!r}"
        return None

    def grid_bound(self) -> int:
        """The most points the grid can have (each parameter's grid values multiplied, conditions ignored): known
        without building it."""
        return math.prod(len(param.grid_values()) for param in self.params)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of grid values in a fixed order, conditions applied, duplicates removed; a grid
        past GRID_LIMIT points is refused (7 parameters of 15-20 values: 24 GB, and the process killed)."""
        if (bound := self.grid_bound()) > GRID_LIMIT:
            sizes = ", ".join(f"{param.name} {len(param.grid_values())}" for param in self.params)
            raise UsageError(f"search space {self.name!r} has a grid of up to {bound:,} points ({sizes} values), "
                             f"more than a grid search walks ({GRID_LIMIT:,}): give its parameters fewer grid=(...) "
                             "values, or sample it with --strategy bayes or random")
        points: list[dict[str, Any]] = [{}]
        for param in self.params:
            points = [{**point, param.name: value} if param.active(point) else point
                      for point in points for value in (param.grid_values() if param.active(point) else (None,))]
        unique, seen = [], set()
        for point in points:
            key = tuple(sorted(point.items()))
            if key not in seen:
                seen.add(key)
                unique.append(point)
        # The first-declared parameter varies fastest, so `--trials N` on a grid spreads over it. A conditional
        # parameter a point lacks ranks as its first value: at -1, sgd's momentum put every adamw point first.
        def order(point):
            return tuple(p.grid_values().index(point[p.name]) if p.name in point else 0 for p in reversed(self.params))
        return sorted(unique, key=order)

    def middle(self) -> dict[str, Any]:
        """A typical point: each parameter's middle grid value (the first of two), conditions applied.
        What a time budget's probe trains to learn what a trial costs."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                grid = param.grid_values()
                values[param.name] = grid[(len(grid) - 1) // 2]
        return values

    def values_of(self, config: TrainConfig) -> dict[str, Any]:
        """`config`'s values of the searched parameters, conditions applied (inside the space or not)."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = getattr(config, param.name)
        return values

    def point_of(self, config: TrainConfig) -> dict[str, Any] | None:
        """The point of this space that `config` is, or None when one of its values lies outside the space."""
        values = self.values_of(config)
        return values if self.mismatch(values) is None else None

    def apply(self, base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
        """The training config of one trial: the experiment's [train] values with the sampled ones on top."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise UsageError(f"values {sorted(unknown)} are not in search space {self.name!r}")
        types = field_types(TrainConfig)
        return dataclasses.replace(base, **{k: types[k](v) for k, v in values.items()})


def validate(space: Space) -> None:
    """Every parameter names a [train] field, conditions refer to earlier parameters, ranges are sane."""
    types = field_types(TrainConfig)
    seen: set[str] = set()
    if not isinstance(space.description, str):  # --list-spaces prints its first paragraph
        raise UsageError(f"search space {space.name!r}: its description must be text, got {space.description!r}")
    for param in space.params:
        if not isinstance(param, Param):
            raise UsageError(f"search space {space.name!r}: its params must be Float, Int or Choice, found "
                             f"{type(param).__name__} {param!r}")
        if param.name not in types:
            raise UsageError(f"search space {space.name!r}: {param.name!r} is not a [train] field")
        if param.name in seen:
            raise UsageError(f"search space {space.name!r} declares {param.name!r} twice")
        for name in param.when:
            if name not in seen:
                later = name in space.names
                raise UsageError(f"search space {space.name!r}: {param.name!r} depends on {name!r}, " + (
                    "which must be declared before it" if later else
                    f"which the space does not search; declare {name!r} before it, or drop the condition"))
        where = f"search space {space.name!r}: {param.name!r}"
        kind = types[param.name]
        if isinstance(param, (Float, Int)):
            allowed = (float,) if isinstance(param, Float) else (int, float)
            if kind not in allowed:  # Float on batch_size trained int(77.5) and showed 77.5; on batch_norm, bool(0.01)
                fit = "Int(...)" if kind is int else "Choice(...)"
                raise UsageError(f"{where} is {_a(type(param).__name__)}, but train.{param.name} is "
                                 f"{_a(kind.__name__)} setting: search it with {fit}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in (param.low, param.high)):
                raise UsageError(f"{where} needs finite numbers for low and high, got {param.low!r} and {param.high!r}")
            if isinstance(param, Int) and not all(isinstance(v, int) for v in (param.low, param.high, *param.grid)):
                raise UsageError(f"{where} is an Int: its low, high and grid values must be ints (write 1, not 1.0), "
                                 f"got low={param.low!r}, high={param.high!r}"
                                 + (f", grid={param.grid!r}" if param.grid else ""))
            if param.low == param.high:
                raise UsageError(f"{where} has low = high = {param.low!r}: to fix a value, leave it out of the space "
                                 f"and set train.{param.name} in the experiment (or --set train.{param.name}=...)")
            if param.low > param.high:
                raise UsageError(f"{where} has low {param.low!r} above high {param.high!r}: swap them")
            if param.log and param.low <= 0:
                raise UsageError(f"{where} is on a log scale, which needs low > 0, got low={param.low!r}; "
                                 "start it above 0, or drop log=True")
            outside = [v for v in param.grid if not param.contains(v)]
            if outside:  # a grid point outside the range trained all the same (lr = 5 in 1e-4..0.5)
                raise UsageError(f"{where} has grid values {outside} outside its range {param.low:g}..{param.high:g}")
        if isinstance(param, Choice) and not param.choices:
            raise UsageError(f"{where} has no choices")
        for what, values in (("choices", param.choices if isinstance(param, Choice) else ()), ("grid values", param.grid)):
            if twice := sorted({repr(v) for v in values if list(values).count(v) > 1}):  # drawn twice as often
                raise UsageError(f"{where} lists {what} more than once ({', '.join(twice)}): name each once")
        strays = [v for v in param.grid if v not in param.choices] if isinstance(param, Choice) else []
        if strays:  # a grid trained them
            raise UsageError(f"{where} has grid values {strays} that are not among its choices {list(param.choices)}")
        values = param.choices if isinstance(param, Choice) else ()
        wrong = [v for v in values if not _of_type(v, kind)]
        if wrong:  # bool('no') is True: batch_norm = 'no' trained with BatchNorm
            raise UsageError(f"{where} has choices {wrong} that are not {kind.__name__} values, as train.{param.name} "
                             "takes" + (" (True or False, not strings)" if kind is bool else ""))
        for name, allowed in param.when.items():
            if not isinstance(allowed, (tuple, list, set, frozenset)):  # "sgd" read as the values 's', 'g', 'd'
                raise UsageError(f"{where}: when={{{name!r}: {allowed!r}}} must name a tuple of values, such as "
                                 f"{{{name!r}: ({allowed!r},)}}")
            condition = next(p for p in space.params if p.name == name)
            if not allowed:
                raise UsageError(f"{where}: when={{{name!r}: ()}} names no value, so it would never be searched")
            if isinstance(condition, Float):  # a continuous draw hits one value with probability 0
                raise UsageError(f"{where} depends on {name} taking the values {list(allowed)}, which a Float draws "
                                 f"with probability 0: condition it on a Choice or an Int")
            never = [v for v in allowed if not condition.contains(v)]
            if never:  # the parameter would never be sampled
                among = (f"{name}'s choices {list(condition.choices)}" if isinstance(condition, Choice)
                         else f"the range of {name}, {condition.low}..{condition.high}")
                raise UsageError(f"{where} depends on {name} being {never}, which is not among {among}")
        seen.add(param.name)


def _a(noun: str) -> str:
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def _of_type(value: Any, kind: type) -> bool:
    """Whether a declared choice is a value of the [train] field's type (an int is a float; a bool is no number)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def edge_values(space: Space) -> list[tuple[Param, Any, str]]:
    """The values a space can give each parameter at its edges: a range's low and high (a setting's rule is an
    interval, so they are enough), its grid values and every choice; (param, value, what it is)."""
    found = []
    for param in space.params:
        if isinstance(param, Choice):
            found += [(param, value, "a choice") for value in param.choices]
        else:
            found += [(param, param.low, "its low"), (param, param.high, "its high")]
            found += [(param, value, "a grid value") for value in param.grid]
    return found
