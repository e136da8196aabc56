"""The audit configuration: one validated document describing what to train, deploy, attack and defend.

A config is a TOML file (the documented format; YAML is read too when PyYAML is installed) whose
sections mirror the pipeline::

    seed = 0, threads (torch threads for training; results do not depend on it)
    [dataset]     name, data_root
    [target]      arch, exits, epochs, lr, batch_size, optimizer, weighting, limit, threshold, tolerance
    [shadow]      arch (default: the target's), exits, data ("same-distribution" or a dataset name), data_root
    [vanilla]     attack (also attack the 1-exit baseline, which is always trained)
    [tau_sweep]   enabled, grid (leakage and cost vs τ, the vanilla model as a line)
    [deployment]  mode ("server" | "in-process"), expose, expose_exit, port, threads, exporter, backend,
                  backend_options (a table of the backend's own options, e.g. ``{int8_heads = true}``)
    [attacks]     names (registry names), adversaries ([1, 2, 3]), stealer, bootstrap, label_only options,
                  reference_models (LiRA/RMIA; 0 = the shadow as the one OUT reference), reference_workers
    [queries]     members, nonmembers, repeats, warmup, query_budget (adaptive querying of the target)
    [timeguard]   sigma_grid_ms, oracle_tolerance, gain_tolerance, key_file, confirm_live, live_adapt
    [[defenses]]  name (a registered defense: padding, optimal, timeguard, …), params — each evaluated offline

Every model forbids unknown keys and checks ranges; cross-field rules (an architecture that cannot take
the dataset, an attack the deployment does not expose enough for, Adversary 3 without a different shadow)
are checked once the whole document is read. Every failure becomes one :class:`ConfigError` line naming
the offending key. ``--set a.b=value`` overrides go through the same validation; a nested table takes a
longer key, e.g. ``--set deployment.backend_options.int8_heads=true`` (the TOML ``[deployment.backend_options]``
table), checked against the chosen backend's options as ``mexit serve --backend-opt`` is.

Why the default looks the way it does: the embedded ``digits`` data are easy, so the threshold search of
``mexit train`` sends almost every sample out at exit 0, which leaves nothing for an exit-based attack to
see. The default audit therefore deploys a fixed, strict threshold (``target.threshold = 0.995``), at
which members still mostly leave early and non-members late — the leak the paper describes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mexit.errors import ConfigError

SAME_DISTRIBUTION = "same-distribution"
MAX_EXITS = 6  # mexit.train.multiexit.MAX_EXITS, repeated here so that reading a config needs no torch

#: Attacks whose inputs need the probabilities the deployment returns.
_NEEDS_PROBS = ("probs", "loss")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DatasetSection(_Section):
    """Which data the target is trained on (and the adversary's same-distribution shadow)."""

    name: str = "digits"
    data_root: Path | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from mexit.data import get_spec

        try:
            return get_spec(v).name
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


class TargetSection(_Section):
    """The deployed multi-exit model: architecture, exits, training settings and its exit threshold."""

    arch: str = "fcn18-1"
    exits: int = Field(4, ge=2, le=MAX_EXITS)
    epochs: int = Field(20, ge=1, le=10_000)
    lr: float | None = Field(None, gt=0, le=10)
    batch_size: int = Field(128, ge=2, le=65_536)
    optimizer: Literal["adam", "sgd"] = "adam"
    weighting: Literal["sum", "sdn"] = "sum"
    limit: int | None = Field(None, ge=8)
    threshold: float | None = Field(None, ge=0, le=1)
    tolerance: float = Field(0.01, ge=0, le=1)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return _check_arch(v)


class ShadowSection(_Section):
    """The adversary's shadow model. Differing from the target (arch or data) adds Adversary 3's shadow."""

    arch: str | None = None
    data: str = SAME_DISTRIBUTION
    data_root: Path | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        return None if v is None else _check_arch(v)

    @field_validator("data")
    @classmethod
    def _known_data(cls, v: str) -> str:
        if v == SAME_DISTRIBUTION:
            return v
        from mexit.data import get_spec

        try:
            return get_spec(v).name
        except ConfigError as exc:
            raise ValueError(f"{exc}, or {SAME_DISTRIBUTION!r}") from None


class VanillaSection(_Section):
    """The 1-exit baseline (always trained). ``attack``: also train its shadow and run the original attacks."""

    attack: bool = True


class TauSweepSection(_Section):
    """Leakage and cost as functions of τ (in-process, exits exposed), with the vanilla model as a line.

    Whether a multi-exit model leaks less than its vanilla backbone (the paper's question) depends on τ; the
    sweep answers it for every τ the owner could have chosen.
    """

    enabled: bool = True
    grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= t <= 1 for t in v):
            raise ValueError(f"give thresholds in [0, 1], got {v}")
        return sorted(set(float(t) for t in v))


class DeploymentSection(_Section):
    """How the target is deployed for the attacker: a real ``mexit serve`` process, or the runtime in-process."""

    mode: Literal["server", "in-process"] = "server"
    expose: Literal["probabilities", "label"] = "probabilities"
    expose_exit: bool = False
    port: int = Field(0, ge=0, le=65_535)
    threads: int = Field(1, ge=1, le=512)
    exporter: Literal["auto", "dynamo", "legacy"] = "legacy"
    backend: str = "onnxruntime"  # a registered runtime backend (mexit.runtime.backend_names())
    #: The backend's own options, as ``mexit serve --backend-opt KEY=VALUE`` takes them (e.g. ``int8_heads = true``
    #: for onnxruntime); given to the served runtime and to the owner's, so the audited timing channel is the
    #: deployed one. ``threads`` stays ``deployment.threads``.
    backend_options: dict[str, bool | int | float | str] = Field(default_factory=dict)

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, v: str) -> str:
        from mexit.runtime.registry import backend_spec

        try:
            backend_spec(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("backend_options")
    @classmethod
    def _backend_takes_them(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "backend" not in info.data:  # the backend itself is invalid: that error is reported
            return v
        try:
            return _backend_options(info.data["backend"], v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


def _backend_options(backend: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``backend``'s own (the registry's rules), strings coerced as on the command line."""
    from mexit.runtime.registry import backend_spec, check_options, parse_backend_options

    resolved = check_options(backend, options)
    if "threads" in resolved:
        raise ConfigError("set the runtime's threads with deployment.threads, not in backend_options")
    defaults = backend_spec(backend).defaults
    out: dict[str, Any] = {}
    for key, value in resolved.items():
        default = defaults.get(key)
        if isinstance(value, str):
            value = parse_backend_options(backend, [f"{key}={value}"])[key]
        elif default is not None and not _same_kind(value, default):
            kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "a string")
            raise ConfigError(f"backend {backend!r}: option {key} takes {kind}, got {value!r}")
        out[key] = value
    return out


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a typed config value fits an option whose default is ``default`` (an int is a float too)."""
    if isinstance(default, str):
        return False  # strings were coerced above
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    return isinstance(value, int) or (isinstance(default, float) and isinstance(value, float))


class LabelOnlySection(_Section):
    """Cost knobs of the label-only robustness measurement (flip copies, or HopSkipJump iterations)."""

    n_noisy: int = Field(200, ge=1, le=100_000)
    max_iter: int = Field(5, ge=1, le=1_000)
    max_eval: int = Field(500, ge=1, le=1_000_000)
    init_eval: int = Field(20, ge=1, le=100_000)
    init_size: int = Field(50, ge=1, le=100_000)


class AttacksSection(_Section):
    """Which membership attacks run, for which adversaries, and how exits are stolen."""

    names: list[str] = Field(default_factory=lambda: [
        "score", "score-hybrid", "loss", "loss-hybrid", "confidence", "confidence-hybrid", "exit-only"])
    adversaries: list[int] = Field(default_factory=lambda: [1, 2])
    stealer: Literal["chosen", "likelihood", "supervised", "supervised-gbt", "kde", "kde-blind"] = "chosen"
    bootstrap: int = Field(200, ge=0, le=100_000)
    label_only: LabelOnlySection = Field(default_factory=LabelOnlySection)
    #: Reference models for LiRA/RMIA: 0 uses the shadow model as the one OUT reference for the target's samples
    #: (offline attacks only, no extra training); N >= 2 trains N models of the target's recipe on random halves
    #: of a pool holding the queried samples, through the local process pool (``reference_workers`` at once).
    reference_models: int = Field(0, ge=0, le=1024)
    reference_workers: int = Field(1, ge=1, le=64)

    @field_validator("names")
    @classmethod
    def _known_attacks(cls, v: list[str]) -> list[str]:
        from mexit.attacks.mia import attack_names

        if not v:
            raise ValueError("name at least one attack")
        known = attack_names()
        for name in v:
            if name not in known:
                raise ValueError(f"unknown attack {name!r}; known: {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError("an attack is listed twice")
        return v

    @field_validator("adversaries")
    @classmethod
    def _known_adversaries(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("name at least one adversary (1, 2 or 3)")
        if any(a not in (1, 2, 3) for a in v) or len(set(v)) != len(v):
            raise ValueError(f"adversaries must be distinct values from 1, 2, 3 (the paper's), got {v}")
        return sorted(v)


class QueriesSection(_Section):
    """How many samples the attacker queries, and how often."""

    members: int = Field(150, ge=10, le=1_000_000)
    nonmembers: int = Field(150, ge=10, le=1_000_000)
    repeats: int = Field(5, ge=1, le=1_000)
    warmup: int = Field(20, ge=0, le=100_000)
    #: Query the target adaptively with this mean number of queries per sample (the shadow keeps ``repeats``).
    query_budget: float | None = Field(None, ge=1, le=200)


class TimeGuardSection(_Section):
    """The timing-defense evaluation: TimeGuard's σ grid, the protection rule, the key, live confirmation.

    Every defense — TimeGuard at each σ of ``sigma_grid_ms`` and each ``[[defenses]]`` entry (padding, the
    optimal schedule, …) — is evaluated offline on the recorded latencies against the strongest adversary
    (:func:`mexit.audit.defense_eval.evaluate_defenses`). Recommended: the cheapest defense whose oracle stealer
    and Bayes bound are within ``oracle_tolerance`` of 1/K (balanced accuracy over the exits in use) and whose
    hybrid membership gain is at most ``gain_tolerance`` AUC with a paired interval reaching 0; it is then
    served for real and measured again (``confirm_live``), refitting on the times it meets live unless
    ``live_adapt`` is false (``mexit serve --no-adapt``; :class:`~mexit.defense.guarded.GuardedRuntime`).
    ``key_file``: the deployment's secret key (``mexit keygen``); absent, one is generated in the run directory.
    """

    sigma_grid_ms: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 5.0, 10.0, 20.0])
    oracle_tolerance: float = Field(0.05, ge=0, le=1)
    gain_tolerance: float = Field(0.01, ge=0, le=1)
    key_file: Path | None = None
    confirm_live: bool = True
    live_adapt: bool = True

    @field_validator("sigma_grid_ms")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one sigma (milliseconds)")
        if any(not (s > 0 and s < 1e6) for s in v):
            raise ValueError(f"every sigma must be a number of milliseconds > 0, got {v}")
        return sorted(set(float(s) for s in v))


class DefenseEntry(_Section):
    """One defense to evaluate: a registered name (:func:`mexit.defense.defense_names`) and its parameters."""

    name: str
    params: dict[str, float | int | str | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _registered(self) -> DefenseEntry:
        from mexit.defense.registry import parse_defense

        try:
            parse_defense(self.name, self.params)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def parsed(self) -> Any:
        """The validated :class:`~mexit.defense.registry.DefenseConfig` (defaults filled in)."""
        from mexit.defense.registry import parse_defense

        return parse_defense(self.name, self.params)


def _default_defenses() -> list[DefenseEntry]:
    return [DefenseEntry(name="padding"), *(DefenseEntry(name="optimal", params={"epsilon": e})
                                             for e in (0.0, 0.01, 0.02, 0.05, 0.1))]


class AuditConfig(_Section):
    """The whole audit. Construct via :func:`load_config`, :func:`default_config` or :func:`make_audit_config`."""

    seed: int = Field(0, ge=0, le=2**31 - 1)
    threads: int | None = Field(None, ge=1, le=512)
    dataset: DatasetSection = Field(default_factory=DatasetSection)
    target: TargetSection = Field(default_factory=TargetSection)
    shadow: ShadowSection = Field(default_factory=ShadowSection)
    vanilla: VanillaSection = Field(default_factory=VanillaSection)
    tau_sweep: TauSweepSection = Field(default_factory=TauSweepSection)
    deployment: DeploymentSection = Field(default_factory=DeploymentSection)
    attacks: AttacksSection = Field(default_factory=AttacksSection)
    queries: QueriesSection = Field(default_factory=QueriesSection)
    timeguard: TimeGuardSection = Field(default_factory=TimeGuardSection)
    #: Defenses evaluated beside TimeGuard's σ grid (``[[defenses]]`` tables: name and params).
    defenses: list[DefenseEntry] = Field(default_factory=_default_defenses)

    @model_validator(mode="after")
    def _cross_field(self) -> AuditConfig:
        _cross_checks(self)
        return self

    # ------------------------------------------------------------------------------ derived views
    @property
    def shadow_arch(self) -> str:
        """The architecture of Adversary 3's shadow (the target's when not given)."""
        return self.shadow.arch or self.target.arch

    @property
    def has_transfer_shadow(self) -> bool:
        """Whether the config describes a shadow that differs from the target (Adversary 3's)."""
        return self.shadow_arch != self.target.arch or self.shadow.data != SAME_DISTRIBUTION

    @property
    def shadow_dataset(self) -> str:
        return self.dataset.name if self.shadow.data == SAME_DISTRIBUTION else self.shadow.data

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (paths as strings)."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the whole config: the identity of an audit."""
        return sha256_json(self.to_dict())


def _check_arch(v: str) -> str:
    from mexit.train.backbones import ARCHITECTURES

    if v not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {v!r}; choose one of {', '.join(ARCHITECTURES)}")
    return v


def _arch_kind(arch: str) -> str:
    from mexit.train.backbones import arch_kind

    return arch_kind(arch)


class _CrossFieldError(ValueError):
    """A cross-field rule failed; ``key`` is the config key to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _cross_checks(cfg: AuditConfig) -> None:
    from mexit.attacks.mia import ATTACKS
    from mexit.data import get_spec

    spec = get_spec(cfg.dataset.name)
    if spec.needs_root and cfg.dataset.data_root is None:
        raise _CrossFieldError("dataset.data_root", f"{spec.name} needs its files: set dataset.data_root to the folder "
                                                    f"that holds {spec.files} (get them from {spec.source})")
    if _arch_kind(cfg.target.arch) != spec.kind:
        raise _CrossFieldError("target.arch", f"{cfg.target.arch} takes {_arch_kind(cfg.target.arch)} inputs but "
                                              f"{spec.name} is {spec.kind} data")
    if cfg.shadow.data == spec.name:
        raise _CrossFieldError("shadow.data", f"{spec.name} is the target's dataset; write {SAME_DISTRIBUTION!r}")
    shadow_spec = get_spec(cfg.shadow_dataset)
    if cfg.shadow.data != SAME_DISTRIBUTION and shadow_spec.needs_root and cfg.shadow.data_root is None:
        raise _CrossFieldError("shadow.data_root", f"the shadow data {shadow_spec.name} needs its files: set "
                                                   f"shadow.data_root to the folder that holds {shadow_spec.files}")
    if _arch_kind(cfg.shadow_arch) != shadow_spec.kind:
        raise _CrossFieldError("shadow.arch", f"{cfg.shadow_arch} takes {_arch_kind(cfg.shadow_arch)} inputs but "
                                              f"the shadow data {shadow_spec.name} is {shadow_spec.kind} data")
    if shadow_spec.num_classes != spec.num_classes:
        raise _CrossFieldError("shadow.data", f"the shadow data {shadow_spec.name} has {shadow_spec.num_classes} "
                                              f"classes but {spec.name} has {spec.num_classes}; attack features "
                                              f"must line up, choose a dataset with as many classes")
    if 3 in cfg.attacks.adversaries and not cfg.has_transfer_shadow:
        raise _CrossFieldError("attacks.adversaries", "adversary 3 needs a shadow that differs from the target: "
                                                      "set shadow.arch to another architecture or shadow.data to "
                                                      "another dataset")
    if cfg.deployment.expose == "label":
        needy = [n for n in cfg.attacks.names if ATTACKS[n].requires & set(_NEEDS_PROBS)]
        if needy:
            raise _CrossFieldError("attacks.names", f"{', '.join(needy)} need probabilities but "
                                                    f"deployment.expose is 'label'; use label-only attacks or "
                                                    f"expose probabilities")
    white_box = [n for n in cfg.attacks.names if "gradient" in ATTACKS[n].requires]
    if white_box and cfg.attacks.adversaries == [3]:
        raise _CrossFieldError("attacks.names", f"{', '.join(white_box)} are white-box attacks (they need the "
                                                "target model), which adversary 3 does not have")
    online = [n for n in cfg.attacks.names if getattr(ATTACKS[n], "online", False)]
    if online and cfg.attacks.reference_models < 2:
        raise _CrossFieldError("attacks.reference_models", f"{', '.join(online)} need reference models that trained "
                                                           "on the queried samples: set attacks.reference_models to "
                                                           "at least 2 (16 or more for stable results), or use the "
                                                           "offline attacks")
    if cfg.queries.members + cfg.queries.nonmembers < 40:
        raise _CrossFieldError("queries.members", "query at least 40 samples in all (members + non-members): "
                                                  "attacks hold out part of the shadow samples for model selection")
    if cfg.timeguard.key_file is not None and not Path(cfg.timeguard.key_file).expanduser().is_file():
        raise _CrossFieldError("timeguard.key_file", f"{cfg.timeguard.key_file} does not exist; create one with "
                                                     f"`mexit keygen --out {cfg.timeguard.key_file}` or leave "
                                                     f"the key out to generate one per run")


# ------------------------------------------------------------------------------------------ loading
def sha256_json(obj: Any) -> str:
    """SHA-256 hex of the canonical (key-sorted, compact) JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    ctx = err.get("ctx") or {}
    original = ctx.get("error")
    if isinstance(original, _CrossFieldError):
        return f"invalid config key {original.key}: {original}"
    key = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        section = _section_model(loc[:-1])
        known = ", ".join(section.model_fields) if section is not None else ""
        where = f"[{'.'.join(loc[:-1])}]" if len(loc) > 1 else "the top level"
        return f"unknown config key {key}" + (f"; keys allowed at {where}: {known}" if known else "")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"missing config key {key}"
    return f"invalid config key {key}: {msg} (got {err.get('input')!r})" if err["type"] != "value_error" \
        else f"invalid config key {key}: {msg}"


def _section_model(path: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = AuditConfig
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def make_audit_config(data: Mapping[str, Any] | None = None) -> AuditConfig:
    """Validate a config document (nested dicts); any problem is one :class:`ConfigError` line."""
    try:
        return AuditConfig.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def default_config_dict() -> dict[str, Any]:
    """The built-in default audit as a document: digits, FCN-18-1 with 4 exits, a real server on loopback."""
    return {
        "seed": 0,
        "dataset": {"name": "digits"},
        "target": {"arch": "fcn18-1", "exits": 4, "epochs": 20, "threshold": 0.995},
        "deployment": {"mode": "server"},
        "queries": {"members": 150, "nonmembers": 150, "repeats": 5},
    }


def default_config(overrides: Iterable[str] = ()) -> AuditConfig:
    """The built-in default audit (a few minutes on 2 CPU cores), with ``key=value`` overrides applied."""
    return make_audit_config(apply_overrides(default_config_dict(), overrides))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw document of a TOML (or, with PyYAML installed, YAML) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a TOML file, or no file for the built-in default")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed: pip install pyyaml, or write the "
                              f"config as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        data = {} if data is None else data
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of settings at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> AuditConfig:
    """Read ``path`` (None: the built-in default), apply ``--set`` style overrides and validate."""
    data = default_config_dict() if path is None else read_config_file(path)
    return make_audit_config(apply_overrides(data, overrides))


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML literal (``3``, ``0.5``, ``true``, ``[1, 2]``, ``"x"``), else the raw string.

    TOML has no null, so the bare words ``none`` and ``null`` unset an optional key (e.g.
    ``target.threshold=none``: deploy the threshold found by the training run's search).
    """
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b=value`` applied (the value parsed by :func:`parse_value`)."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set takes key=value with a dotted key (e.g. target.epochs=5), got {item!r}")
        parts = key.split(".")
        node: dict[str, Any] = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(raw.strip())
    return out
