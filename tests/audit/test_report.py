"""The report: every figure present and embedded, the verdict first, rebuilt from artifacts alone."""

from __future__ import annotations

import base64
import shutil
from html.parser import HTMLParser

import pytest

from mexit.audit.report import (
    FIGURES,
    backend_label,
    build_report,
    render_html,
    served_defense_note,
    summary_table,
    verdict,
)
from mexit.audit.results import REPORT_FILE
from mexit.errors import UserError


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.links: list[str] = []
        self.order: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("id", "")] = a.get("src", "")
            self.order.append("img")
        if tag == "div" and a.get("class") == "verdict":
            self.order.append("verdict")
        for name in ("href", "src"):
            if name in a and tag not in ("img",):
                self.links.append(a[name])


def _parse(path):
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_every_figure_is_embedded_as_png(tiny_run):
    out, _ = tiny_run
    page = _parse(out / REPORT_FILE)
    assert set(page.images) == {f"fig-{name}" for name in FIGURES}
    for src in page.images.values():
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert page.links == []  # self-contained: no external scripts, styles or images
    assert page.order[0] == "verdict"  # the verdict comes before any figure


def test_verdict_and_summary_table_state_the_headline_numbers(tiny_run):
    _, results = tiny_run
    lines = verdict(results)
    assert "the stealer adversary 2 picks" in lines[0] and "balanced accuracy" in lines[0] and "chance" in lines[0]
    assert "*" not in " ".join(lines)  # plain text: markdown emphasis would show as literal asterisks
    assert any(results["defenses"]["verdict"] in line for line in lines)
    assert any("paper.txt line 178" in line for line in lines)  # the paper's own words, with their line
    table = summary_table(results)
    assert "loss-hybrid" in table and "padding(" in table and "(* recommended" in table
    # every defense row shows its hybrid gain, in columns aligned under the header however long its label
    header = next(line for line in table.splitlines() if line.startswith("defense"))
    rows = [line for line in table.splitlines() if line.startswith(("padding(", "timeguard(", "optimal(", "none"))]
    assert rows and all(len(line) == len(header) for line in rows), (header, rows)
    gains = [row["hybrid_gain"]["value"] for row in results["defenses"]["rows"] if row.get("hybrid_gain")]
    assert gains and all(f"{g:.3f}" in table for g in gains)


def test_each_attack_is_read_from_its_interval_and_an_inverted_rule_is_explained(tiny_run):
    import copy

    from mexit.audit.report import INVERTED_NOTE, auc_reading

    _, results = tiny_run
    assert auc_reading({"auc": {"value": 0.6, "ci": [0.55, 0.65]}}) == "leaks"
    assert auc_reading({"auc": {"value": 0.5, "ci": [0.45, 0.55]}}) == "n.s."
    assert auc_reading({"auc": {"value": 0.42, "ci": [0.36, 0.48]}}) == "inverted"
    assert auc_reading({"auc": {"value": 0.42, "ci": None}}) == "no CI"
    flipped = copy.deepcopy(results)
    adv = next(iter(flipped["adversaries"].values()))
    name, entry = next((n, e) for n, e in adv["attacks"].items() if "error" not in e)
    entry["auc"] = {"value": 0.42, "ci": [0.36, 0.48]}
    table = summary_table(flipped)
    row = next(line for line in table.splitlines() if f" {name} " in f" {line} " and "[0.360, 0.480]" in line)
    assert "inverted" in row
    assert INVERTED_NOTE in table
    page = render_html(flipped, {})
    assert ">inverted<" in page and "does not transfer from shadow to target" in page


def test_a_hybrid_gain_over_an_inverted_original_is_not_sold_as_the_exits_information(tiny_run):
    import copy

    _, results = tiny_run
    adv = results["adversaries"][str(max(int(k) for k in results["adversaries"]))]
    assert "best_hybrid_vs_best_original" in adv  # written by the audit
    r = copy.deepcopy(results)
    adv = r["adversaries"][str(max(int(k) for k in r["adversaries"]))]
    template = next(e for e in adv["attacks"].values() if "error" not in e)
    adv["attacks"]["score"] = {**template, "auc": {"value": 0.42, "ci": [0.36, 0.48]}}
    adv["attacks"]["loss"] = {**template, "auc": {"value": 0.56, "ci": [0.50, 0.62]}}
    adv["best_original"] = {"attack": "loss", "auc": 0.56, "balanced_accuracy": 0.51}
    adv["best_hybrid"] = {"attack": "score-hybrid", "auc": 0.56, "balanced_accuracy": 0.52}
    gain = {"difference": 0.138, "ci": [0.037, 0.247], "significant": True}
    adv["pairs"] = [{"hybrid": "score-hybrid", "original": "score", "paired": {"auc": gain}}]
    adv["best_hybrid_vs_best_original"] = {"hybrid": "score-hybrid", "original": "loss", "paired": {
        "auc": {"difference": 0.008, "ci": [-0.03, 0.05], "significant": False}}}
    line = next(x for x in verdict(r) if x.startswith(f"Adversary {adv['adversary']}"))
    assert "+0.008 [-0.030, +0.050] — not significant (the interval includes 0) against that best original" in line
    assert "+0.138 [+0.037, +0.247] — a significant gain against its own original score" in line
    assert "inverted" in line and "not the exit's information" in line
    assert "best hybrid score-hybrid − best original loss" in render_html(r, {})


def test_the_deployed_backend_is_shown_with_its_own_options(tiny_run):
    _, results = tiny_run
    assert "Deployment: in-process on onnxruntime, exposes" in render_html(results, {})
    deployment = {**results["config"]["deployment"], "backend_options": {"int8_heads": True, "spinning": False}}
    assert backend_label(deployment) == "onnxruntime (int8_heads=true, spinning=false)"
    assert backend_label({"mode": "server"}) == "onnxruntime"  # results written before the options existed


def test_report_is_rebuilt_from_results_and_artifacts(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    run_dir = tmp_path / "copy"
    shutil.copytree(out, run_dir)
    (run_dir / REPORT_FILE).unlink()
    for stage in run_dir.glob("train-*"):  # the models are not needed to rebuild a report
        shutil.rmtree(stage)
    monkeypatch.setattr("mexit.audit.pipeline.run_audit", lambda *a, **k: pytest.fail("re-ran the audit"))
    path = build_report(run_dir)
    assert path == run_dir / REPORT_FILE
    assert set(_parse(path).images) == {f"fig-{name}" for name in FIGURES}


def test_report_of_a_directory_without_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"holds no results\.json"):
        build_report(tmp_path)


def test_a_figure_that_fails_is_left_out_not_fatal(tiny_run, tmp_path, monkeypatch):
    from mexit.audit import report

    out, _ = tiny_run
    run_dir = tmp_path / "copy"
    shutil.copytree(out, run_dir)
    monkeypatch.setattr(report, "_fig_loss", lambda *a, **k: 1 / 0)
    path = build_report(run_dir)
    images = set(_parse(path).images)
    assert "fig-loss" not in images and len(images) == len(FIGURES) - 1
    assert "could not be drawn" in path.read_text(encoding="utf-8")


def test_live_verdict_says_when_the_defense_does_not_hold_live():
    from mexit.audit.report import live_verdict

    block = {"chance_balanced": 1 / 6}
    cfg = {"timeguard": {"oracle_tolerance": 0.05}}
    leaky = {"label": "optimal(epsilon=0.02)", "oracle_balanced_accuracy": 0.298, "mean_added_ms": 1.358,
             "offline_prediction": {"oracle_balanced_accuracy": 0.167}}
    text = live_verdict(leaky, block, cfg)
    assert "does NOT hold live" in text and "offline prediction 0.17" in text and "Confirmed" not in text
    tight = {**leaky, "oracle_balanced_accuracy": 0.18}
    assert "holds live" in live_verdict(tight, block, cfg) and "NOT" not in live_verdict(tight, block, cfg)
    assert "could not be judged" in live_verdict({**tight, "oracle_balanced_accuracy": None}, None, {})
    # the exits' order in the release times, read from its interval (absent in results written before it existed)
    assert "exit-ranking" not in live_verdict(tight, block, cfg)
    ordered = live_verdict({**tight, "exit_ranking_auc": 0.56, "exit_ranking_auc_ci": [0.52, 0.60]}, block, cfg)
    assert "exit-ranking AUC 0.56 [0.52, 0.60]: the exits' order still shows" in ordered
    flat = live_verdict({**tight, "exit_ranking_auc": 0.51, "exit_ranking_auc_ci": [0.47, 0.55]}, block, cfg)
    assert "do not order the exits (the interval includes 0.5)" in flat



def test_the_served_guard_is_described_in_one_sentence():
    state = {"policy": "optimal", "calibration": "force_exit", "requests": 1500, "overruns": 15, "adapt": True,
             "refits": 2, "relaxes": 0, "refit_margin_s": 0.0004, "live_shift_s": [0.0, 0.0001, 0.0002],
             "bayes_bound": 0.1767, "earliest_release_s": 0.0021, "overruns_per_exit": [0, 5, 10],
             "requests_per_exit": [1000, 300, 200]}
    note = served_defense_note(state)
    assert note is not None
    for part in ("1500 requests", "15 of them", "(1.0 %, by exit: 0/1000, 5/300, 10/200)", "refitted 2 time(s)",
                 "margin of 0.40 ms", "[0.00, 0.10, 0.20] ms", "Bayes bound 0.177", "earliest release 2.10 ms"):
        assert part in note, (part, note)
    assert "after requests" not in note  # results written before the refit history existed
    history = [{"relax": False, "at_request": 54, "overruns_per_exit_before": [0, 2, 7]},
               {"relax": False, "at_request": 108, "overruns_per_exit_before": [0, 3, 9]}]
    note = served_defense_note({**state, "refit_history": history})
    assert "refitted 2 time(s) on live times after requests 54, 108" in note, note
    assert "9 of the overruns came before the first refit" in note, note
    assert served_defense_note(None) is None and served_defense_note({}) is None


def test_the_accuracy_figure_shows_a_vanilla_line_below_every_exit():
    import matplotlib.pyplot as plt

    from mexit.audit.report import _fig_accuracy_flops

    per = [{"train_accuracy": 0.7 + 0.05 * k, "test_accuracy": 0.36 + 0.01 * k, "flops_fraction": (k + 1) / 3}
           for k in range(3)]
    r = {"models": {"target": {"per_exit": per, "arch": "resnet56", "dataset": "cifar10"},
                    "vanilla-target": {"final_exit": {"test_accuracy": 0.288}}}}
    fig = _fig_accuracy_flops(r)
    try:
        assert fig.axes[0].get_ylim()[0] < 0.288  # the dashed line its legend names is on the chart
    finally:
        plt.close(fig)
