"""The end-to-end audit: every results section, caching and resume, servers always stopped, bad run directories."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest

from mexit.audit import pipeline
from mexit.audit.config import make_audit_config
from mexit.audit.pipeline import run_audit
from mexit.audit.results import AUDIT_FILE, RESULTS_FILE, SCHEMA, load_results
from mexit.audit.store import StageStore
from mexit.errors import ConfigError, DataError, UserError
from tests.audit._tiny import TINY, copy_trained, tiny

SECTIONS = ("schema", "config", "config_hash", "seeds", "versions", "models", "leakage", "stealing", "adversaries",
            "vanilla", "tau_sweep", "defenses", "live", "timings", "wall_seconds", "artifacts")


def test_results_hold_every_section(tiny_run):
    out, results = tiny_run
    assert results["schema"] == SCHEMA
    assert all(section in results for section in SECTIONS)
    assert json.loads((out / RESULTS_FILE).read_text()) == json.loads(json.dumps(results))
    assert (out / "report.html").is_file()

    # accuracy and FLOPs per exit, for the target and the vanilla baseline
    target = results["models"]["target"]
    assert len(target["per_exit"]) == 3
    assert all(0 <= e["test_accuracy"] <= 1 and e["flops"] > 0 for e in target["per_exit"])
    assert [e["flops"] for e in target["per_exit"]] == sorted(e["flops"] for e in target["per_exit"])
    assert results["models"]["vanilla-target"]["exits"] == 1
    assert target["deployed_threshold"] == pytest.approx(0.2)

    # exit distributions and loss divergence, from the 30 + 30 queried samples
    leak = results["leakage"]
    assert sum(leak["members_per_exit"]) == 30 and sum(leak["nonmembers_per_exit"]) == 30
    assert "loss_js_divergence_per_exit" in leak

    # stealing: every stealer scored against the true exits, next to its chance levels; the chosen one named
    st = results["stealing"]
    for stealer in ("kde", "kde-blind", "supervised"):
        entry = st["stealers"][stealer]
        assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["balanced_accuracy"] <= 1
        assert np.asarray(entry["confusion_matrix"]).sum() == 60
        assert entry["chance"] == st["chance"] and entry["balanced_chance"] >= 1 / 3
    assert st["chance"] >= 1 / 3 and st["chosen"] in st["stealers"]

    # attacks for adversaries 1 and 2 with CIs, original/hybrid pairs, and the vanilla baseline
    assert sorted(results["adversaries"]) == ["1", "2"]
    for adv in results["adversaries"].values():
        assert set(adv["attacks"]) == set(TINY["attacks"]["names"])
        loss = adv["attacks"]["loss-hybrid"]
        assert "error" not in loss, loss
        lo, hi = loss["auc"]["ci"]
        assert lo <= loss["auc"]["value"] <= hi
        assert loss["roc"]["fpr"][0] == 0 and loss["roc"]["tpr"][-1] == 1
        assert {p["hybrid"] for p in adv["pairs"]} == {"loss-hybrid", "confidence-hybrid"}
    assert results["adversaries"]["1"]["exit_accuracy"] == 1.0  # exposed exits are the true ones
    # original attacks ignore exits: adversaries 1 and 2 share the same shadow, hence the same result
    adv1, adv2 = results["adversaries"]["1"], results["adversaries"]["2"]
    assert adv1["attacks"]["loss"]["auc"] == adv2["attacks"]["loss"]["auc"]
    assert set(results["vanilla"]["attacks"]) == {"loss", "confidence"}

    # every defense against the strongest adversary: TimeGuard's σ grid and the [[defenses]] entries, the
    # recommendation and its live confirmation
    block = results["defenses"]
    labels = [row["label"] for row in block["rows"]]
    assert labels[0] == "none" and "timeguard(sigma_ms=0.1)" in labels and "timeguard(sigma_ms=1)" in labels
    assert any(lb.startswith("padding(") for lb in labels) and any(lb.startswith("optimal(") for lb in labels)
    for row in block["rows"][1:]:
        assert row["mean_added_ms"] >= 0 and 0 <= row["oracle_balanced_accuracy"] <= 1
        assert 0 <= row["bayes_bound"] <= 1 and "meets" in row
    assert block["chance_balanced"] == pytest.approx(1 / len(block["exits_in_use"]))
    assert block["verdict"]
    rec, live = block["recommended"], results["live"]
    if rec and rec["defense"] != "none":
        assert live["label"] == rec["label"] and np.isfinite(live["mean_added_ms"])
        live_dir = next(tiny_run[0].glob("defense-live-*"))  # the cost is measured against a fresh recording
        assert {"undefended.npz", "defended.npz", "signals.npz"} <= {p.name for p in live_dir.iterdir()}
    else:
        assert live is None

    # the τ sweep: leakage per τ with the vanilla model as a line; the τ rule recorded with the deployed τ
    sweep = results["tau_sweep"]
    assert [r["tau"] for r in sweep["rows"]] == [round(0.1 * i, 1) for i in range(11)]
    assert sweep["reference"]["vanilla"]["best_original_auc"] is not None
    assert target["tau_rule"]["rule"] == "vanilla" and target["threshold_source"] == "config"
    assert target["threshold"]["curve"]  # every run's τ choice can be checked

    # provenance and timings
    assert results["seeds"]["seed"] == 0
    assert results["versions"]["versions"]["numpy"]
    assert {"train-target", "collect-target", "attacks", "defenses", "tau-sweep"} <= set(results["timings"])


def test_stage_folders_are_keyed_and_complete(tiny_run):
    out, results = tiny_run
    for name, timing in results["timings"].items():
        folder = out / timing["dir"]
        assert folder.name.startswith(name + "-") and len(folder.name) == len(name) + 13
        done = json.loads((folder / "done.json").read_text())
        assert done["stage"] == name and done["key"] == folder.name[-12:]


def test_rerun_reuses_every_stage(tiny_run, tmp_path, monkeypatch):
    out, results = tiny_run
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    calls = []
    monkeypatch.setattr("mexit.train.runner.train_run", lambda *a, **k: calls.append(a))
    again = run_audit(TINY, copy, progress=False, report=False)
    assert not calls
    assert all(t["cached"] for t in again["timings"].values())
    assert again["adversaries"] == results["adversaries"] and again["defenses"] == results["defenses"]


def test_interrupted_audit_resumes_without_retraining(tiny_run, tmp_path, monkeypatch):
    """Killed after training (Ctrl-C during a later stage), then re-run: no model is trained again."""
    out, _ = tiny_run
    run_dir = copy_trained(out, tmp_path / "resumed")
    import mexit.train.runner as runner
    import mexit.train.trainer as trainer

    trained = []
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: trained.append("train_run"))
    monkeypatch.setattr(trainer, "train_epoch", lambda *a, **k: trained.append("train_epoch"))
    real_steal = pipeline._steal_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_steal_stage", interrupted)
    cfg = tiny(tau_sweep={"enabled": False})  # not what this test is about, and a third of a tiny audit's time
    with pytest.raises(KeyboardInterrupt):
        run_audit(cfg, run_dir, progress=False)
    assert not (run_dir / RESULTS_FILE).exists()
    collected = sorted(p.name for p in run_dir.glob("collect-target-*"))
    assert collected and (run_dir / collected[0] / "done.json").exists()

    monkeypatch.setattr(pipeline, "_steal_stage", real_steal)
    results = run_audit(cfg, run_dir, progress=False, report=False)
    assert trained == []
    assert results["timings"]["train-target"]["cached"] and results["timings"]["collect-target"]["cached"]
    assert not results["timings"]["steal"]["cached"]
    assert (run_dir / RESULTS_FILE).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_server_is_stopped_when_a_stage_fails(tiny_run, tmp_path, monkeypatch, error):
    out, _ = tiny_run
    run_dir = copy_trained(out, tmp_path / "served")
    import mexit.serve.deploy as deploy

    started = []

    class Recording(deploy.ServerProcess):
        def start(self):  # type: ignore[override]
            proc = super().start()
            started.append(self.pid)
            return proc

    def failing_collect(client, *args, **kwargs):
        assert client.ready()  # the server is up and answering when the stage fails
        raise error

    monkeypatch.setattr(deploy, "ServerProcess", Recording)
    from mexit.attacks import flow

    monkeypatch.setattr(flow, "collect_signals", failing_collect)
    with pytest.raises(type(error)):
        run_audit(tiny(deployment={"mode": "server"}), run_dir, progress=False)
    assert len(started) == 1
    deadline = time.monotonic() + 5
    while _alive(started[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(started[0]), "the audit left its server running"


def test_backend_options_key_the_deployment_stages_only_when_set():
    plain = make_audit_config(TINY)
    on = make_audit_config(tiny(deployment={"backend_options": {"int8_heads": True}}))
    off = make_audit_config(tiny(deployment={"backend_options": {"int8_heads": False}}))
    assert pipeline._backend_deps(plain) == {"backend": "onnxruntime"}  # the keys of earlier runs still hold
    assert pipeline._backend_deps(on) == {"backend": "onnxruntime", "backend_options": {"int8_heads": True}}
    keys = {StageStore.key_of("collect-target", {"export": "e", **pipeline._backend_deps(c)}) for c in (plain, on, off)}
    assert len(keys) == 3


class _Stop(Exception):
    pass


@pytest.mark.parametrize("mode", ["in-process", "server"])
def test_backend_options_reach_the_deployment_and_the_owner(tiny_run, tmp_path, monkeypatch, mode):
    """``deployment.backend_options`` run the deployed runtime (a ``mexit serve --backend-opt`` child, or the
    in-process one) and the owner's ground truth with int8 heads, in a collection stage of its own."""
    out, _ = tiny_run
    run_dir = copy_trained(out, tmp_path / "int8")
    import mexit.serve.deploy as deploy
    from mexit.attacks import flow

    seen = {}

    class Recording(deploy.ServerProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["args"] = self.args

    def stop_collecting(client, *args, true_exit_runtime=None, **kwargs):
        assert client.ready()  # the child took the option and serves
        seen["client"], seen["owner"] = client, true_exit_runtime
        raise _Stop

    monkeypatch.setattr(deploy, "ServerProcess", Recording)
    monkeypatch.setattr(flow, "collect_signals", stop_collecting)
    with pytest.raises(_Stop):
        run_audit(tiny(deployment={"mode": mode, "backend_options": {"int8_heads": True}}), run_dir, progress=False)
    assert seen["owner"].backend.options["int8_heads"] is True
    if mode == "server":
        pairs = list(zip(seen["args"], seen["args"][1:], strict=False))
        assert ("--backend-opt", "int8_heads=true") in pairs
    else:
        assert seen["client"]._client.runtime.backend.options["int8_heads"] is True
        old = {p.name for p in out.glob("collect-shadow-*")}
        new = {p.name for p in run_dir.glob("collect-shadow-*")}
        assert new and not new & old  # the same deployment without int8 heads is another stage


def test_port_in_use_is_one_clear_error_before_anything_is_written(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            run_audit(tiny(deployment={"mode": "server", "port": port}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_incompatible_run_directory_is_refused_untouched(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / AUDIT_FILE).write_text(json.dumps({"schema": "mexit.audit/0"}))
    (run_dir / "results.json").write_text('{"schema": "mexit.audit/0"}')
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(UserError, match=r"incompatible mexit \(schema 'mexit.audit/0'"):
        run_audit(TINY, run_dir, progress=False)
    with pytest.raises(UserError, match="incompatible"):
        load_results(run_dir)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a mexit audit directory"):
        run_audit(TINY, tmp_path, progress=False)


def test_data_root_without_data_fails_before_writing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny(dataset={"name": "location", "data_root": str(empty)})
    with pytest.raises(DataError):
        run_audit(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_too_many_queried_members_names_the_key(tmp_path):
    cfg = tiny(queries={"members": 60})
    with pytest.raises(ConfigError, match=r"queries\.members: 60 samples asked but the target_train part"):
        run_audit(cfg, tmp_path / "run", progress=False)


def test_adversary_3_uses_its_own_shadow_and_stolen_exits(tiny_run, tmp_path):
    out, _ = tiny_run
    run_dir = copy_trained(out, tmp_path / "adv3")
    cfg = tiny(shadow={"arch": "fcn18-2"}, attacks={"adversaries": [2, 3]}, vanilla={"attack": False},
               timeguard={"sigma_grid_ms": [1.0], "confirm_live": False}, tau_sweep={"enabled": False})
    results = run_audit(cfg, run_dir, progress=False, report=False)
    assert results["models"]["shadow3"]["arch"] == "fcn18-2"
    assert not results["timings"]["train-shadow3"]["cached"] and results["timings"]["train-target"]["cached"]
    adv3 = results["adversaries"]["3"]
    assert adv3["exit_source"] == "stolen-kde-blind"  # no same-architecture timings to align or learn from
    assert set(adv3["attacks"]) == set(TINY["attacks"]["names"])
    # adversary 3's shadow differs, so even the original attacks are fitted on other signals than adversary 2's
    assert adv3["attacks"]["loss"]["threshold"] != results["adversaries"]["2"]["attacks"]["loss"]["threshold"]
    assert results["live"] is None


def test_collection_interrupted_midway_resumes_against_a_restarted_server(tiny_run, tmp_path, monkeypatch, caplog):
    out, _ = tiny_run
    run_dir = copy_trained(out, tmp_path / "midway")
    cfg = tiny(deployment={"mode": "server"}, vanilla={"attack": False}, timeguard={"confirm_live": False},
               tau_sweep={"enabled": False})
    import mexit.serve.client as client_mod

    real_infer = client_mod.OIPClient.infer
    calls = []

    def flaky_infer(self, x, outputs=None):
        calls.append(1)
        if len(calls) == 70:  # warm-up (2) plus most of the first round of the shadow collection
            raise KeyboardInterrupt
        return real_infer(self, x, outputs)

    monkeypatch.setattr(client_mod.OIPClient, "infer", flaky_infer)
    with pytest.raises(KeyboardInterrupt):
        run_audit(cfg, run_dir, progress=False)
    [partial] = run_dir.glob("collect-shadow-*")
    assert (partial / "collect.ckpt.npz").exists() and not (partial / "done.json").exists()

    monkeypatch.setattr(client_mod.OIPClient, "infer", real_infer)
    with caplog.at_level("INFO", logger="mexit.attacks.collect"):
        results = run_audit(cfg, run_dir, progress=False, report=False)
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    assert results["models"]["shadow"]["deployment"]["mode"] == "server"
    assert not (partial / "collect.ckpt.npz").exists() and (partial / "done.json").exists()


def test_mexit_attack_and_the_audit_agree_on_the_same_signals(tiny_run, tmp_path):
    """One attack flow: `mexit attack`'s analysis of the audit's recorded signals gives the audit's numbers."""
    import shutil

    from mexit.attacks.flow import AttackPlan, analyse
    from mexit.attacks.signals import Signals

    out, results = tiny_run
    target = Signals.load(out / results["artifacts"]["target_signals"])
    shadow = Signals.load(out / results["artifacts"]["shadow_signals"])
    cfg = results["config"]
    plan = AttackPlan(attacks=cfg["attacks"]["names"], adversaries=cfg["attacks"]["adversaries"],
                      seed=cfg["seed"], bootstrap=cfg["attacks"]["bootstrap"], stealer=cfg["attacks"]["stealer"])
    mine = analyse(plan, target=target, shadow=shadow)
    assert json.loads(json.dumps(mine["adversaries"])) == json.loads(json.dumps(results["adversaries"]))
    assert mine["exit_stealing"]["chosen"] == results["stealing"]["chosen"]
    for name, entry in mine["exit_stealing"]["stealers"].items():
        assert entry["accuracy"] == results["stealing"]["stealers"][name]["accuracy"]

    # and through `mexit attack` itself: it reuses recorded signals found in its --out directory
    from mexit.attacks import flow

    attack_dir = tmp_path / "attack"
    attack_dir.mkdir()
    shutil.copy(out / results["artifacts"]["target_signals"], attack_dir / "signals_target.npz")
    shutil.copy(out / results["artifacts"]["shadow_signals"], attack_dir / "signals_shadow.npz")
    side = flow.Side(client=None, queries=None, owner=None)  # type: ignore[arg-type]
    via_cli = flow.run_attack_flow(side, side, plan, attack_dir, progress=False)
    assert json.loads(json.dumps(via_cli["adversaries"])) == json.loads(json.dumps(results["adversaries"]))
