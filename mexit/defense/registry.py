"""The defense registry: name → description, validated parameters and a policy builder.

The CLI (``mexit serve --defense NAME --param k=v``), the audit config (a list of defenses) and the
frontier evaluation all go through here, so a new defense is one module plus one :func:`register` call.
Parameter values may arrive as strings (from the command line) and are coerced; an unknown defense or
parameter, or a value out of range, is one :class:`~mexit.errors.ConfigError` line (exit code 2).

Time parameters are in milliseconds (what users think in); the policies take seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mexit.defense.calibration import CleanTimes
from mexit.defense.hashing import hasher_for
from mexit.defense.keys import as_secret_key
from mexit.defense.optimal import DEFAULT_GRID, OptimalSchedule
from mexit.defense.padding import DEFAULT_QUANTILE, QuantilePadding
from mexit.defense.timeguard import DelayPolicy, TimeGuard
from mexit.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default (``None`` = optional, ``REQUIRED`` = must be given), range check and help."""

    name: str
    type: type
    default: Any
    check: Callable[[Any], bool]
    rule: str
    help: str


REQUIRED = object()
MAX_QUANTILE_REPEATS = 1000


@dataclass(frozen=True)
class DefenseSpec:
    """A registered defense: ``build(params, key, kind) -> DelayPolicy``; ``needs_key`` if it keys per-input values."""

    name: str
    description: str
    params: tuple[Param, ...]
    build: Callable[[dict[str, Any], bytes | None, str], DelayPolicy]
    needs_key: bool = True


@dataclass(frozen=True)
class DefenseConfig:
    """A validated defense choice: the name and every parameter (defaults filled in), JSON-ready."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        """Short label for tables and plots, e.g. ``timeguard(sigma_ms=2)``."""
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in self.params.items() if v is not None)
        return f"{self.name}({shown})"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


DEFENSES: dict[str, DefenseSpec] = {}


def register(spec: DefenseSpec) -> DefenseSpec:
    """Add a defense to the registry (a duplicate name is a programming error)."""
    if spec.name in DEFENSES:
        raise ValueError(f"defense {spec.name!r} is already registered")
    DEFENSES[spec.name] = spec
    return spec


def defense_names() -> list[str]:
    """The registered defense names, sorted (for ``--help`` and error messages)."""
    return sorted(DEFENSES)


def get_spec(name: str) -> DefenseSpec:
    """The spec of ``name``, or a ConfigError listing the valid names."""
    try:
        return DEFENSES[name]
    except KeyError:
        raise ConfigError(f"unknown defense {name!r}; valid defenses: {', '.join(defense_names())}") from None


def _coerce(spec: DefenseSpec, p: Param, value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "null") and p.default is None:
            return None
        try:
            value = p.type(text)
        except ValueError:
            raise ConfigError(f"{spec.name} parameter {p.name} must be a {p.type.__name__} ({p.rule}), "
                              f"got {value!r}") from None
    elif value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ConfigError(f"{spec.name} parameter {p.name} must be a number ({p.rule}), got {value!r}")
        value = p.type(value)
    if value is not None and not (p.check(value) and (not isinstance(value, float) or math.isfinite(value))):
        raise ConfigError(f"{spec.name} parameter {p.name} must be {p.rule}, got {value!r}")
    return value


def parse_defense(name: str, params: Mapping[str, str | float | int | None] | None = None) -> DefenseConfig:
    """Validate a defense choice: coerce string values, fill defaults, check ranges; one ConfigError line each."""
    spec = get_spec(name)
    given = dict(params or {})
    known = {p.name: p for p in spec.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"defense {name} takes no parameter {', '.join(unknown)}; its parameters: "
                          f"{', '.join(known) or '(none)'}")
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.name in given:
            out[p.name] = _coerce(spec, p, given[p.name])
        elif p.default is REQUIRED:
            raise ConfigError(f"defense {name} needs parameter {p.name} ({p.rule}), e.g. --param {p.name}=...")
        else:
            out[p.name] = p.default
    return DefenseConfig(name, out)


def parse_param_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``["sigma_ms=5", "cap_ms=20"]`` (``--param k=v`` options) as a dict; a malformed pair is one line."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"defense parameter {pair!r} is not NAME=VALUE (e.g. --param sigma_ms=5)")
        out[name.strip()] = value.strip()
    return out


def parse_defense_list(items: Sequence[Mapping[str, Any] | str]) -> list[DefenseConfig]:
    """An audit config's ``defenses`` list: names, or tables ``{name = "...", params = {...}}``."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(parse_defense(item))
        elif isinstance(item, Mapping) and "name" in item and set(item) <= {"name", "params"}:
            out.append(parse_defense(str(item["name"]), item.get("params") or {}))
        else:
            raise ConfigError(f"each defenses entry is a name or {{name = ..., params = {{...}}}}, got {item!r}")
    return out


def describe_defenses() -> str:
    """One line per defense with its parameters, for ``--help`` texts."""
    lines = []
    for name in defense_names():
        spec = DEFENSES[name]
        ps = ", ".join(f"{p.name} ({p.rule}" + ("" if p.default in (REQUIRED, None) else f", default {p.default:g}")
                       + ")" for p in spec.params)
        lines.append(f"{name}: {spec.description} [{ps}]")
    return "\n".join(lines)


def build_policy(config: DefenseConfig, *, key: bytes | None, kind: str) -> DelayPolicy:
    """The (not yet calibrated) delay policy of ``config``; a keyed defense without a >= 32-byte key is refused."""
    spec = get_spec(config.name)
    if spec.needs_key:
        if key is None:
            raise ConfigError(f"defense {config.name} needs a secret key: pass --key-file (make one with "
                              f"`mexit keygen --out KEYFILE`)")
        key = as_secret_key(key)
    return spec.build(dict(config.params), key, kind)


def build_guarded(runtime: Any, config: DefenseConfig, *, key: bytes | None, kind: str,
                  calibration_inputs: np.ndarray | None = None, clean_times: CleanTimes | None = None,
                  repeats: int | None = None, adapt: bool = True) -> Any:
    """A :class:`~mexit.defense.guarded.GuardedRuntime` for ``config``, calibrated now (``adapt``: refit on live
    times after overruns, see :class:`~mexit.defense.guarded.GuardedRuntime`).

    Calibration uses ``clean_times`` when given (e.g. from an audit's recording), else the runtime
    (``force_exit`` or ``calibration_inputs``) with ``repeats`` calls per exit — by default enough for
    the policy's quantile (``1 / (1 − q)``, at most 1000: a few seconds at start-up). Anything that fails
    raises: a defense that was asked for is never silently dropped, so a server built from this refuses to
    start instead of serving unguarded.
    """
    from mexit.defense.guarded import DEFAULT_REPEATS, GuardedRuntime

    policy = build_policy(config, key=key, kind=kind)
    if repeats is None:
        # A quantile needs enough measurements to exist: p99.9 of 20 calls is just their maximum.
        q = getattr(policy, "quantile", None)
        repeats = DEFAULT_REPEATS if q is None else int(min(MAX_QUANTILE_REPEATS, max(DEFAULT_REPEATS,
                                                                                      math.ceil(1 / (1 - q + 1e-12)))))
    return GuardedRuntime(runtime, policy, calibration_inputs=calibration_inputs, clean_times=clean_times,
                          repeats=repeats, adapt=adapt)


# ------------------------------------------------------------------------------------ registrations
def _ms(v: float | None) -> float | None:
    return None if v is None else float(v) / 1e3


register(DefenseSpec(
    "timeguard", "TimeGuard: release at the exit's clean time + a keyed half-normal delay (Li et al. Alg. 1)",
    (Param("sigma_ms", float, REQUIRED, lambda v: v > 0, "> 0 ms", "half-normal scale of the delay"),
     Param("cap_ms", float, None, lambda v: v >= 0, ">= 0 ms", "optional cap on the delay")),
    lambda p, key, kind: TimeGuard(p["sigma_ms"] / 1e3, key or b"", hasher_for(kind), cap_s=_ms(p["cap_ms"]))))

register(DefenseSpec(
    "padding", "padding: release every answer at a high quantile of the slowest exit's clean time + margin",
    (Param("quantile", float, DEFAULT_QUANTILE, lambda v: 0 < v <= 1, "in (0, 1]", "clean-time quantile padded to"),
     Param("margin_ms", float, 0.0, lambda v: v >= 0, ">= 0 ms", "added to the quantile")),
    lambda p, key, kind: QuantilePadding(p["quantile"], p["margin_ms"] / 1e3), needs_key=False))

register(DefenseSpec(
    "optimal", "optimal schedule: the cheapest keyed release whose Bayes exit stealer is within epsilon of 1/K",
    (Param("epsilon", float, 0.05, lambda v: 0 <= v < 1, "in [0, 1 - 1/K]", "allowed Bayes advantage over 1/K"),
     Param("quantile", float, DEFAULT_QUANTILE, lambda v: 0 < v <= 1, "in (0, 1]", "earliest release per exit"),
     Param("margin_ms", float, 0.0, lambda v: v >= 0, ">= 0 ms", "added to each exit's quantile"),
     Param("p99_ms", float, None, lambda v: v > 0, "> 0 ms", "optional limit on the p99 release time"),
     Param("grid", int, DEFAULT_GRID, lambda v: 2 <= v <= 4096, "an integer in [2, 4096]", "release grid points")),
    lambda p, key, kind: OptimalSchedule(p["epsilon"], key or b"", hasher_for(kind), quantile=p["quantile"],
                                         margin_s=p["margin_ms"] / 1e3, p99_s=_ms(p["p99_ms"]),
                                         grid_points=p["grid"])))
