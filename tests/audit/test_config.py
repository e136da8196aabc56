"""Audit config validation: ranges, unknown keys, cross-field rules, overrides, files and the config hash."""

from __future__ import annotations

import pytest

from mexit.audit.config import (
    AuditConfig,
    apply_overrides,
    default_config,
    load_config,
    make_audit_config,
    parse_value,
)
from mexit.errors import ConfigError
from tests.audit._tiny import TINY, toml_of


def test_default_config_is_the_documented_small_digits_audit():
    cfg = default_config()
    assert isinstance(cfg, AuditConfig)
    assert (cfg.dataset.name, cfg.target.arch, cfg.target.exits) == ("digits", "fcn18-1", 4)
    assert cfg.deployment.mode == "server" and cfg.deployment.expose_exit is False
    assert 5 <= cfg.queries.repeats <= 10
    assert cfg.attacks.adversaries == [1, 2]
    assert cfg.shadow_arch == "fcn18-1" and not cfg.has_transfer_shadow


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["target.exits=9"], "target.exits"),
        (["target.exits=1"], "target.exits"),
        (["target.epochs=0"], "target.epochs"),
        (["target.threshold=1.5"], "target.threshold"),
        (["queries.repeats=0"], "queries.repeats"),
        (["timeguard.sigma_grid_ms=[0.5, -1]"], "timeguard.sigma_grid_ms"),
        (["timeguard.sigma_grid_ms=[]"], "timeguard.sigma_grid_ms"),
        (["defenses=[{name='nope'}]"], "defenses.0"),
        (["defenses=[{name='optimal', params={epsilon=2}}]"], "defenses.0"),
        (["defenses=[{name='padding', params={quantile=0}}]"], "defenses.0"),
        (["defenses=[{name='timeguard', params={sigma_ms=0}}]"], "defenses.0"),
        (["deployment.backend='openvinox'"], "deployment.backend"),
        (["attacks.names=['lira-online']"], "attacks.reference_models"),
        (["deployment.mode='cloud'"], "deployment.mode"),
        (["deployment.port=70000"], "deployment.port"),
        (["seed=-1"], "seed"),
    ],
)
def test_out_of_range_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        default_config(overrides)
    assert str(info.value).startswith(f"invalid config key {needle}:")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["target.epoch=5"], r"unknown config key target\.epoch; keys allowed at \[target\]: .*epochs"),
        (["nonsense.x=1"], "unknown config key nonsense"),
        (["colour=1"], "unknown config key colour"),
    ],
)
def test_unknown_keys_are_refused_with_the_allowed_ones(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        default_config(overrides)


@pytest.mark.parametrize(
    ("overrides", "key", "needle"),
    [
        (["target.arch='vgg16'"], "target.arch", "image inputs but digits is tabular"),
        (["attacks.adversaries=[3]"], "attacks.adversaries", "adversary 3 needs a shadow that differs"),
        (["deployment.expose='label'"], "attacks.names", "need probabilities"),
        (["shadow.data='digits'"], "shadow.data", "same-distribution"),
        (["shadow.data='location'", "shadow.data_root='/x'"], "shadow.data", "30 classes"),
        (["dataset.name='cifar10'", "target.arch='vgg16'"], "dataset.data_root", "needs its files"),
        (["attacks.names=['gradient']", "shadow.arch='fcn18-2'", "attacks.adversaries=[3]"], "attacks.names",
         "white-box"),
        (["queries.members=10", "queries.nonmembers=10"], "queries.members", "at least 40"),
        (["timeguard.key_file='/no/such/key'"], "timeguard.key_file", "mexit keygen"),
        (["attacks.names=['score', 'nope']"], "attacks.names", "unknown attack 'nope'"),
        (["attacks.adversaries=[1, 1]"], "attacks.adversaries", "distinct"),
        # a backend's own options are checked against that backend's (the registry's rules)
        (["deployment.backend_options.int8_head=true"], "deployment.backend_options",
         "backend 'onnxruntime' takes no option 'int8_head'; its options are threads, device, fp16, "),
        (["deployment.backend_options.int8_heads=2"], "deployment.backend_options",
         "option int8_heads takes true or false, got 2"),
        (["deployment.backend_options.int8_heads='maybe'"], "deployment.backend_options", "takes true/false"),
        (["deployment.backend_options.threads=2"], "deployment.backend_options", "deployment.threads"),
        (["deployment.backend_options.fp16=1"], "deployment.backend_options", "fp16 must be true or false"),
        # values the backend refuses whatever the bundle: at config load, not when the runtime is built
        (["deployment.backend_options.fp16=true"], "deployment.backend_options", "has no FP16 mode"),
        (["deployment.backend_options.device=0"], "deployment.backend_options", "needs a GPU backend"),
        (["deployment.backend='onnxruntime-gpu'", "deployment.backend_options.provider='rocm'"],
         "deployment.backend_options", "provider must be 'cuda' or 'tensorrt'"),
    ],
)
def test_cross_field_rules(overrides, key, needle):
    with pytest.raises(ConfigError) as info:
        default_config(overrides)
    assert str(info.value).startswith(f"invalid config key {key}:")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_adversary_3_with_another_architecture_is_accepted():
    cfg = default_config(["shadow.arch='fcn18-2'", "attacks.adversaries=[3, 1]"])
    assert cfg.attacks.adversaries == [1, 3]
    assert cfg.has_transfer_shadow and cfg.shadow_arch == "fcn18-2" and cfg.shadow_dataset == "digits"


def test_overrides_parse_toml_literals_and_bare_strings():
    assert parse_value("3") == 3
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("'x'") == "x"
    assert parse_value("in-process") == "in-process"
    assert parse_value("none") is None and parse_value("null") is None
    assert default_config(["target.threshold=none"]).target.threshold is None
    cfg = default_config(["deployment.mode=in-process", "target.epochs=3", "timeguard.sigma_grid_ms=[2, 0.5]",
                          "target.limit=100"])
    assert cfg.deployment.mode == "in-process"
    assert cfg.target.epochs == 3 and cfg.target.limit == 100
    assert cfg.timeguard.sigma_grid_ms == [0.5, 2.0]  # sorted
    assert cfg.timeguard.live_adapt is True
    assert default_config(["timeguard.live_adapt=false"]).timeguard.live_adapt is False


@pytest.mark.parametrize("bad", ["target.epochs", "=3", "target..epochs=3"])
def test_malformed_override_is_one_clear_line(bad):
    with pytest.raises(ConfigError, match="--set takes key=value"):
        apply_overrides({}, [bad])


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match="seed is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "audit.toml"
    path.write_text(toml_of(TINY))
    cfg = load_config(path, ["queries.repeats=3"])
    assert cfg.target.epochs == 2 and cfg.queries.repeats == 3 and cfg.deployment.mode == "in-process"
    assert cfg == make_audit_config({**TINY, "queries": {**TINY["queries"], "repeats": 3}})


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[target\nexits = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_yaml_config_when_pyyaml_is_installed(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML is optional; TOML is the documented format")
    path = tmp_path / "audit.yaml"
    path.write_text("seed: 3\ntarget:\n  exits: 2\n  epochs: 4\n")
    cfg = load_config(path)
    assert (cfg.seed, cfg.target.exits, cfg.target.epochs) == (3, 2, 4)


def test_config_hash_is_canonical_and_sensitive():
    a = make_audit_config(TINY)
    b = make_audit_config(dict(reversed(list(TINY.items()))))
    assert a.digest() == b.digest() and len(a.digest()) == 64
    c = make_audit_config({**TINY, "seed": 1})
    assert c.digest() != a.digest()


def test_a_bad_defense_says_which_ones_exist():
    with pytest.raises(ConfigError, match="valid defenses: optimal, padding, timeguard"):
        default_config(["defenses=[{name='nope'}]"])
    with pytest.raises(ConfigError, match=r"epsilon must be in \[0, 1 - 1/K\]"):
        default_config(["defenses=[{name='optimal', params={epsilon=2}}]"])


def test_backend_options_are_the_backends_own_in_toml_or_set(tmp_path):
    path = tmp_path / "audit.toml"
    path.write_text(toml_of(TINY) + "\n[deployment.backend_options]\nint8_heads = true\n")
    from_file = load_config(path)
    assert from_file.deployment.backend_options == {"int8_heads": True}
    assert default_config().deployment.backend_options == {}
    from_set = default_config(["deployment.backend_options.int8_heads=true"])
    assert from_set.deployment.backend_options == {"int8_heads": True}
    assert from_set.digest() != default_config().digest()
    # strings are coerced as ``mexit serve --backend-opt`` does: the string "false" is not a true value
    assert default_config(["deployment.backend_options.int8_heads='false'"]).deployment.backend_options == {
        "int8_heads": False}
