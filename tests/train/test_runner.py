"""Training runs end to end on the embedded digits data: metrics, reuse, resume, refusal of bad input."""

import json

import numpy as np
import pytest
import torch

from mexit.errors import ConfigError, UserError
from mexit.train import runner
from mexit.train.runner import load_run, make_config, train_run

FAST = dict(dataset="digits", arch="fcn18-1", exits=3, epochs=3, batch_size=16, limit=120, seed=3, threads=1)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = train_run(make_config(**FAST), out, progress=False)
    return out, metrics


def test_run_writes_metrics_and_threshold(finished_run):
    out, metrics = finished_run
    for name in ("config.json", "splits.npz", "model.pt", "metrics.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint.pt").exists()  # the resume point goes once the run is complete
    assert len(metrics["per_exit"]) == 3
    flops = [row["flops"] for row in metrics["per_exit"]]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    assert 0.0 <= metrics["threshold"]["tau"] <= 1.0
    assert metrics["final_exit"]["train_accuracy"] > 0.5  # digits is easy even after 3 epochs
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["provenance"]["versions"]["torch"]


def test_rerun_reuses_complete_run(finished_run, monkeypatch):
    out, metrics = finished_run
    monkeypatch.setattr(runner, "train_epoch", lambda *a, **k: pytest.fail("a complete run must not retrain"))
    assert train_run(make_config(**FAST), out, progress=False) == metrics


def test_load_run_rebuilds_the_model(finished_run):
    out, metrics = finished_run
    run = load_run(out)
    assert run.threshold == metrics["threshold"]["tau"]
    x = run.dataset.inputs(run.splits.target_test[:20])
    with torch.no_grad():
        acc = (run.model(torch.from_numpy(x))[-1].argmax(1).numpy() == run.dataset.y[run.splits.target_test[:20]])
    assert acc.mean() == pytest.approx(metrics["final_exit"]["test_accuracy"], abs=0.35)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, finished_run, monkeypatch):
    calls = {"n": 0}
    real = runner.train_epoch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # simulated Ctrl-C during epoch 3
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(make_config(**FAST), tmp_path, progress=False, checkpoint_every_s=0)
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.json").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 2

    resumed_epochs = []
    monkeypatch.setattr(runner, "train_epoch", lambda *a, **k: resumed_epochs.append(1) or real(*a, **k))
    metrics = train_run(make_config(**FAST), tmp_path, progress=False, checkpoint_every_s=0)
    assert len(resumed_epochs) == 1  # only epoch 3 was trained again
    ref_out, ref_metrics = finished_run
    got = torch.load(tmp_path / "model.pt", weights_only=False)["model"]
    ref = torch.load(ref_out / "model.pt", weights_only=False)["model"]
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert metrics["per_exit"] == ref_metrics["per_exit"]


def test_checkpoints_are_rate_limited(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(runner, "_save_checkpoint", lambda path, model, opt, epoch, history: saved.append(epoch))
    train_run(make_config(**FAST), tmp_path, progress=False)  # 3 quick epochs: well inside 30 s
    assert saved == []
    train_run(make_config(**{**FAST, "seed": 4}), tmp_path / "every", progress=False, checkpoint_every_s=0)
    assert saved == [1, 2]  # never after the last epoch: the final weights follow at once


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="exits"):
        make_config(**{**FAST, "exits": 7})
    with pytest.raises(ConfigError, match="unknown dataset"):
        make_config(**{**FAST, "dataset": "mnist"})
    with pytest.raises(ConfigError, match="unknown architecture"):
        make_config(**{**FAST, "arch": "resnet9000"})


def test_other_config_in_run_dir_is_refused(finished_run):
    out, _ = finished_run
    with pytest.raises(UserError, match="different configuration"):
        train_run(make_config(**{**FAST, "seed": 4}), out, progress=False)


def test_missing_data_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError):
        train_run(make_config(dataset="location", data_root=tmp_path / "nowhere", arch="fcn18-1", exits=2), out)
    assert not out.exists()


def test_splits_are_reused_from_the_run(finished_run):
    out, _ = finished_run
    a = np.load(out / "splits.npz")
    run = load_run(out)
    assert np.array_equal(a["target_train"], run.splits.target_train)


def test_run_records_tau_curve_and_deployed_accuracy(finished_run):
    _, metrics = finished_run
    th = metrics["threshold"]
    assert th["rule"] == "final-exit" and len(th["curve"]) == 21  # the whole curve is kept with the run
    assert len(metrics["deployed_curve"]) == 21
    dep = metrics["deployed"]
    assert dep["tau"] == th["tau"]
    assert 0.0 <= dep["train_accuracy"] <= 1.0 and 0.0 <= dep["test_accuracy"] <= 1.0
    assert sum(dep["train_exit_shares"]) == pytest.approx(1.0)
    top = metrics["deployed_curve"][-1]  # τ = 1: nobody is that confident, everyone takes the final exit
    assert top["train_exit_shares"][-1] == 1.0
    assert top["train_accuracy"] == pytest.approx(metrics["final_exit"]["train_accuracy"])


def test_target_and_shadow_start_from_different_weights(tmp_path, monkeypatch):
    """One seed gives both roles one partition (disjoint parts) but their initial weights must differ."""
    inits = {}
    real = runner._build

    def spy(config, dataset):
        model = real(config, dataset)
        inits[config.role] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(runner, "_build", spy)
    cfg = {**FAST, "epochs": 1}
    t = train_run(make_config(**cfg), tmp_path / "t", progress=False)
    s = train_run(make_config(**{**cfg, "role": "shadow"}), tmp_path / "s", progress=False)
    assert t["init_seed"] != s["init_seed"]
    weights = [k for k, v in inits["target"].items() if v.dim() >= 2]  # layers, not BatchNorm ones/zeros
    assert weights
    assert not any(torch.equal(inits["target"][k], inits["shadow"][k]) for k in weights)
    assert runner.role_seed(3, "target") == t["init_seed"]  # deterministic in (seed, role)
    assert runner.role_seed(3, "target") != runner.role_seed(4, "target")
    st, ss = load_run(tmp_path / "t").splits, load_run(tmp_path / "s").splits
    assert st == ss  # the split is seeded by the seed alone
    from mexit.data.splits import check_disjoint

    check_disjoint(st, ss)


def test_vanilla_tau_rule(tmp_path, finished_run):
    out, metrics = finished_run
    with pytest.raises(ConfigError, match="needs the vanilla model"):
        train_run(make_config(**FAST), tmp_path / "x", progress=False, tau_rule="vanilla")
    assert not (tmp_path / "x").exists()
    vanilla = tmp_path / "vanilla"
    van = train_run(make_config(**{**FAST, "exits": 1}), vanilla, progress=False)
    with pytest.raises(ConfigError, match="1-exit run"):
        train_run(make_config(**FAST), tmp_path / "y", progress=False, vanilla_run=out)
    # a finished run asked for the paper's rule re-picks τ from its recorded curve, without retraining
    again = train_run(make_config(**FAST), out, progress=False, vanilla_run=vanilla)
    th = again["threshold"]
    assert th["rule"] == "vanilla" and th["vanilla_accuracy"] == van["final_exit"]["val_accuracy"]
    assert th["curve"] == metrics["threshold"]["curve"]
    assert again["deployed"]["tau"] == th["tau"]
    eligible = [p for p in th["curve"] if p["accuracy"] >= th["vanilla_accuracy"] - th["tolerance"] - 1e-12]
    if eligible:
        assert th["flops_fraction"] == min(p["flops_fraction"] for p in eligible)
    back = runner.rechoose_threshold(out, rule="final-exit")
    assert back["threshold"]["tau"] == metrics["threshold"]["tau"]


def test_class_skewed_shadow_trains_on_a_recorded_subset(tmp_path, finished_run):
    """Adversary 3's other-data shadow: its run's splits are the subset it trained on, disjoint from the target's."""
    from mexit.data.splits import check_disjoint

    cfg = {**FAST, "epochs": 1, "role": "shadow", "subset": "class-skewed"}
    m = train_run(make_config(**cfg), tmp_path / "s", progress=False)
    shadow, target = load_run(tmp_path / "s"), load_run(finished_run[0])
    assert m["data"]["subset"] == "class-skewed" and m["split_sizes"]["train"] == len(shadow.splits.shadow_train)
    assert len(shadow.splits.shadow_train) < len(target.splits.shadow_train) and m["data"]["label_shift"] > 0.1
    assert set(shadow.splits.shadow_train) <= set(target.splits.shadow_train)
    check_disjoint(target.splits, shadow.splits)
    assert "subset" not in make_config(**FAST).identity()  # runs from before the option keep their digest
    assert make_config(**cfg).digest() != make_config(**{**cfg, "subset": "all"}).digest()
