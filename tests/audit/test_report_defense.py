"""The report's defense section renders the frontier block: verdict, table, an embedded PNG, escaped text."""

from __future__ import annotations

import base64
import logging

import pytest

from mexit.audit import report_defense
from mexit.audit.report_defense import defense_figures, render_defense_section


def _row(label: str, defense: str, params: dict, mean: float, bayes: float, gain: float | None) -> dict:
    return {"label": label, "defense": defense, "params": params, "mean_added_ms": mean, "p99_added_ms": 2 * mean,
            "bayes_bound": bayes, "oracle_balanced_accuracy": bayes - 0.01,
            "best_shipped_balanced_accuracy": bayes - 0.1,
            "exit_ranking_auc": 0.5 + bayes / 4, "meets": bayes < 0.3,
            "hybrid_gain": None if gain is None else {"value": gain, "ci": [gain - 0.02, gain + 0.02]}}


def _block() -> dict:
    rows = [_row("none", "none", {}, 0.0, 0.98, 0.1),
            _row("timeguard(sigma_ms=1)", "timeguard", {"sigma_ms": 1.0}, 0.8, 0.6, 0.05),
            _row("timeguard(sigma_ms=5)", "timeguard", {"sigma_ms": 5.0}, 4.0, 0.32, 0.02),
            _row("padding(quantile=0.999, margin_ms=0)", "padding", {"quantile": 0.999}, 3.0, 0.25, 0.0),
            _row("optimal(epsilon=0.02)", "optimal", {"epsilon": 0.02}, 2.0, 0.27, 0.0)]
    return {"rows": rows, "chance_balanced": 0.25, "exits_in_use": [0, 1, 2, 3], "rule": "cheapest <with> rule",
            "verdict": "optimal(epsilon=0.02) wins: *1.5x* cheaper", "recommended": {"label": "optimal(epsilon=0.02)"},
            "oracle_label": "oracle (upper bound)", "note": "offline", "skipped": [{"label": "optimal(epsilon=0.9)",
                                                                                   "reason": "epsilon too large"}]}


def test_section_renders_table_figure_and_escaped_text() -> None:
    html = render_defense_section(_block())
    assert html.startswith("<section id='defenses'>") and html.rstrip().endswith("</section>")
    assert "*1.5x*" in html and "&lt;with&gt;" in html  # text is escaped, not interpreted as markdown or HTML
    assert html.count("<tr>") == 6 and "optimal(epsilon=0.02) ★" in html
    assert "[-0.020, +0.020]" in html and "epsilon too large" in html and "upper bound" in html
    b64 = html.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert render_defense_section(None) == ""


def test_a_failing_figure_is_logged_and_left_out(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def boom(block: dict) -> None:
        raise RuntimeError("no")

    monkeypatch.setattr(report_defense, "_fig_protection", boom)
    with caplog.at_level(logging.ERROR):
        assert defense_figures(_block()) == {}
    assert "left out" in caplog.text
    assert "could not be drawn" in render_defense_section(_block())
