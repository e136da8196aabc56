"""The end-to-end audit: config, cached pipeline, report and sweeps.

``run_audit(config, out_dir)`` trains the target, shadow and vanilla models, deploys them, collects what an
attacker sees, steals exits from response times, runs the original and hybrid membership attacks for each
adversary, evaluates TimeGuard over a σ grid and confirms the recommended σ live, then writes
``results.json`` and a self-contained ``report.html``. ``run_sweep`` runs many audits on a process pool
or Ray and aggregates them into one table.
"""

from mexit.audit.config import AuditConfig, default_config, load_config, make_audit_config
from mexit.audit.pipeline import run_audit
from mexit.audit.report import build_report, summary_table
from mexit.audit.results import SCHEMA, load_results
from mexit.audit.sweep import run_sweep

__all__ = [
    "SCHEMA",
    "AuditConfig",
    "build_report",
    "default_config",
    "load_config",
    "load_results",
    "make_audit_config",
    "run_audit",
    "run_sweep",
    "summary_table",
]
