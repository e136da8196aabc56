"""The defense registry: names, coerced and validated parameters, one-line errors, guarded runtimes built or refused."""

from __future__ import annotations

import numpy as np
import pytest

from mexit.defense import CleanTimes, GuardedRuntime, OptimalSchedule, QuantilePadding, TimeGuard
from mexit.defense.registry import (
    DEFENSES,
    build_guarded,
    build_policy,
    defense_names,
    describe_defenses,
    parse_defense,
    parse_defense_list,
    parse_param_pairs,
)
from mexit.errors import ConfigError
from tests.defense._fakes import FakeRuntime, PlainFakeRuntime, inputs_for_exits

KEY = bytes(range(32))


def test_names_and_help() -> None:
    assert defense_names() == ["optimal", "padding", "timeguard"]
    text = describe_defenses()
    assert all(name in text for name in DEFENSES) and "sigma_ms" in text and "epsilon" in text


def test_cli_strings_are_coerced_and_defaults_filled() -> None:
    cfg = parse_defense("timeguard", {"sigma_ms": "2.5"})
    assert cfg.params == {"sigma_ms": 2.5, "cap_ms": None} and cfg.label() == "timeguard(sigma_ms=2.5)"
    opt = parse_defense("optimal", {"epsilon": "0.1", "grid": "64", "p99_ms": "none"})
    assert opt.params["epsilon"] == 0.1 and opt.params["grid"] == 64 and opt.params["p99_ms"] is None
    assert parse_defense("padding").params == {"quantile": 0.999, "margin_ms": 0.0}
    assert opt.to_json() == {"name": "optimal", "params": opt.params}


@pytest.mark.parametrize(("name", "params", "message"), [
    ("tg", {}, "unknown defense 'tg'; valid defenses: optimal, padding, timeguard"),
    ("timeguard", {"sigma": "1"}, "defense timeguard takes no parameter sigma; its parameters: sigma_ms, cap_ms"),
    ("timeguard", {}, "defense timeguard needs parameter sigma_ms"),
    ("timeguard", {"sigma_ms": "0"}, "timeguard parameter sigma_ms must be > 0 ms, got 0.0"),
    ("timeguard", {"sigma_ms": "abc"}, "timeguard parameter sigma_ms must be a float"),
    ("padding", {"quantile": 1.5}, r"padding parameter quantile must be in \(0, 1\], got 1.5"),
    ("padding", {"quantile": "0"}, r"padding parameter quantile must be in \(0, 1\]"),
    ("optimal", {"epsilon": "-0.1"}, r"optimal parameter epsilon must be in \[0, 1 - 1/K\]"),
    ("optimal", {"epsilon": True}, "must be a number"),
    ("padding", {"margin_ms": "nan"}, "margin_ms must be >= 0 ms"),
])
def test_bad_choices_are_one_line(name: str, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        parse_defense(name, params)
    assert "\n" not in str(exc.value)


def test_build_policy_types_and_key_rules() -> None:
    assert isinstance(build_policy(parse_defense("timeguard", {"sigma_ms": 1}), key=KEY, kind="tabular"), TimeGuard)
    assert isinstance(build_policy(parse_defense("padding"), key=None, kind="image"), QuantilePadding)
    assert isinstance(build_policy(parse_defense("optimal"), key=KEY, kind="image"), OptimalSchedule)
    with pytest.raises(ConfigError, match="needs a secret key"):
        build_policy(parse_defense("optimal"), key=None, kind="tabular")
    with pytest.raises(ConfigError, match="shorter than the 32 bytes"):
        build_policy(parse_defense("timeguard", {"sigma_ms": 1}), key=b"x" * 31, kind="tabular")


def test_build_guarded_calibrates_distributions_and_fits_the_policy() -> None:
    rt = FakeRuntime((0.001, 0.002, 0.003))
    x = inputs_for_exits([0, 0, 1, 2, 2, 2])
    guarded = build_guarded(rt, parse_defense("optimal", {"epsilon": 0.1}), key=KEY, kind="tabular",
                            calibration_inputs=x, repeats=3)
    assert isinstance(guarded, GuardedRuntime) and guarded.calibration_method == "force_exit"
    assert guarded.clean_times is not None and np.allclose(guarded.clean_times.shares, [2 / 6, 1 / 6, 3 / 6])
    policy = guarded.policy
    assert isinstance(policy, OptimalSchedule) and policy.bound is not None and policy.bound <= 1 / 3 + 0.1 + 1e-7
    pred = guarded.predict(x[:1])
    assert pred.latency_ns[0] >= 0.001e9 and guarded.requests == 1
    assert guarded.describe()["policy"] == "optimal"


def test_a_defense_that_cannot_be_built_is_refused_not_dropped() -> None:
    with pytest.raises(ConfigError, match="calibration_inputs"):
        build_guarded(PlainFakeRuntime(), parse_defense("padding"), key=None, kind="tabular")
    with pytest.raises(ConfigError, match=r"\[0, 0\.5\]"):  # two exits in use: epsilon <= 1/2
        build_guarded(FakeRuntime(), parse_defense("optimal", {"epsilon": 0.6}), key=KEY, kind="tabular",
                      clean_times=CleanTimes.from_samples([[1e-3], [2e-3], []], [5, 5, 0]))
    with pytest.raises(ConfigError, match="needs clean-time distributions"):
        GuardedRuntime(FakeRuntime(), QuantilePadding(), clean_times_s=[0.001, 0.002, 0.003])


def test_padding_counts_overruns() -> None:
    rt = FakeRuntime((0.001, 0.002, 0.3))
    # Calibrated as if the final exit took 100 ms: its real 300 ms compute overruns and leaves at completion.
    clean = CleanTimes.from_samples([[0.001], [0.002], [0.1]])
    guarded = GuardedRuntime(rt, QuantilePadding(1.0), clean_times=clean)
    guarded.predict(inputs_for_exits([0]))
    guarded.predict(inputs_for_exits([2]))
    assert guarded.requests == 2 and guarded.overruns == 1


def test_cli_pairs_and_config_lists() -> None:
    assert parse_param_pairs(["sigma_ms=5", " cap_ms = 20 "]) == {"sigma_ms": "5", "cap_ms": "20"}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_param_pairs(["sigma_ms"])
    configs = parse_defense_list(["padding", {"name": "optimal", "params": {"epsilon": 0.02}}])
    assert [c.name for c in configs] == ["padding", "optimal"] and configs[1].params["epsilon"] == 0.02
    with pytest.raises(ConfigError, match="each defenses entry"):
        parse_defense_list([{"sigma_ms": 1}])
