"""``mexit attack``: attack a deployed multi-exit model through its outputs and its response times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

DEFAULT_ATTACKS = ("score", "score-hybrid", "loss", "loss-hybrid", "confidence", "confidence-hybrid", "exit-only")


def _client(where: str, model_name: str | None, expose: str, expose_exit: bool, threads: int) -> tuple[Any, Any]:
    """A client for a bundle directory (in-process) or an OIP server URL, and a ground-truth runtime if local."""
    from mexit.runtime import EarlyExitRuntime
    from mexit.serve import LocalClient, OIPClient

    if where.startswith(("http://", "https://")):
        if not model_name:
            raise click.UsageError(f"pass the model name served at {where} (--target-model/--shadow-model)")
        return OIPClient(where, model_name), None
    runtime = EarlyExitRuntime(where, intra_op_threads=threads)
    runtime.warmup(5)
    return LocalClient(runtime, expose=expose, expose_exit=expose_exit), runtime


@click.command("attack")
@click.option("--target", required=True, help="Target deployment: a bundle directory or an OIP server URL.")
@click.option("--target-run", required=True, type=click.Path(path_type=Path),
              help="The target's training run: which samples are members (target train) and non-members.")
@click.option("--shadow", required=True, help="The attacker's shadow deployment: a bundle directory or a URL.")
@click.option("--shadow-run", required=True, type=click.Path(path_type=Path),
              help="The shadow model's training run (trained with --role shadow).")
@click.option("--target-model", default=None, help="Model name at the target URL.")
@click.option("--shadow-model", default=None, help="Model name at the shadow URL.")
@click.option("--target-bundle", type=click.Path(path_type=Path), default=None,
              help="For a URL target: its bundle, to score exit stealing against the true exits.")
@click.option("--shadow-bundle", type=click.Path(path_type=Path), default=None,
              help="For a URL shadow: its bundle (the attacker owns the shadow, so it knows the shadow's exits).")
@click.option("--shadow3", default=None,
              help="Adversary 3's shadow deployment (another architecture and/or other data, same classes and exit "
                   "count): a bundle directory or a URL.")
@click.option("--shadow3-run", type=click.Path(path_type=Path), default=None,
              help="The training run of adversary 3's shadow (trained with --role shadow).")
@click.option("--shadow3-model", default=None, help="Model name at the --shadow3 URL.")
@click.option("--shadow3-bundle", type=click.Path(path_type=Path), default=None,
              help="For a URL --shadow3: its bundle (the attacker knows its own shadow's exits).")
@click.option("--expose", type=click.Choice(["probabilities", "label"]), default="probabilities", show_default=True,
              help="For bundle targets: what the in-process deployment reveals.")
@click.option("--expose-exit", is_flag=True, help="For bundle targets: also reveal exits (Adversary 1).")
@click.option("--attacks", default=",".join(DEFAULT_ATTACKS), show_default=True,
              help="Comma-separated attack names (see mexit.attacks.mia.attack_names()).")
@click.option("--adversary", "adversaries", type=click.IntRange(1, 3), multiple=True, default=(1, 2),
              show_default=True, help="1: exit exposed; 2: exit stolen from response times; 3: exit stolen, shadow "
              "of another architecture or data (needs --shadow3). Repeatable.")
@click.option("--samples", type=int, default=200, show_default=True, help="Members (and as many non-members).")
@click.option("--repeats", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Queries per sample (latency repeats).")
@click.option("--label-only-queries", type=click.IntRange(1, 100_000), default=100, show_default=True,
              help="Label-only attacks: noisy copies queried per tabular sample.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="Runtime threads for bundle targets.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Dataset directory, if moved.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for signals and results.")
def command(target: str, target_run: Path, shadow: str, shadow_run: Path, target_model: str | None,
            shadow_model: str | None, target_bundle: Path | None, shadow_bundle: Path | None, shadow3: str | None,
            shadow3_run: Path | None, shadow3_model: str | None, shadow3_bundle: Path | None, expose: str,
            expose_exit: bool, attacks: str,
            adversaries: tuple[int, ...], samples: int, repeats: int, label_only_queries: int, seed: int, threads: int,
            data_root: Path | None, out_dir: Path) -> None:
    """Query TARGET and SHADOW, steal exits from latency, run original and hybrid membership attacks."""
    from mexit.attacks.experiment import AttackSettings, QuerySet, run_experiment
    from mexit.attacks.mia import attack_names
    from mexit.runtime import EarlyExitRuntime
    from mexit.train.runner import load_run

    names = [a.strip() for a in attacks.split(",") if a.strip()]
    unknown = sorted(set(names) - set(attack_names()))
    if unknown:
        raise click.UsageError(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(attack_names())}")
    if 3 in adversaries and (shadow3 is None or shadow3_run is None):
        raise click.UsageError("adversary 3 needs its own shadow: pass --shadow3 and --shadow3-run")
    t_run, s_run = load_run(target_run, data_root=data_root), load_run(shadow_run, data_root=data_root)
    if t_run.dataset.num_classes != s_run.dataset.num_classes:
        raise click.UsageError("target and shadow runs are on datasets with different classes")
    t_client, t_rt = _client(target, target_model, expose, expose_exit, threads)
    if t_rt is None and target_bundle is not None:
        t_rt = EarlyExitRuntime(target_bundle, intra_op_threads=threads)
    s_client, s_rt = _client(shadow, shadow_model, expose, expose_exit, threads)
    if s_rt is None:
        if shadow_bundle is None:
            raise click.UsageError("a URL shadow needs --shadow-bundle: the attacker must know its own shadow's exits")
        s_rt = EarlyExitRuntime(shadow_bundle, intra_op_threads=threads)
    s3: dict[str, Any] = {}
    if 3 in adversaries:
        assert shadow3 is not None and shadow3_run is not None
        s3_run = load_run(shadow3_run, data_root=data_root)
        if s3_run.dataset.num_classes != t_run.dataset.num_classes:
            raise click.UsageError("adversary 3's shadow run is on a dataset with different classes from the target")
        s3_client, s3_rt = _client(shadow3, shadow3_model, expose, expose_exit, threads)
        if s3_rt is None:
            if shadow3_bundle is None:
                raise click.UsageError("a URL --shadow3 needs --shadow3-bundle: the attacker must know its shadow's "
                                       "exits")
            s3_rt = EarlyExitRuntime(shadow3_bundle, intra_op_threads=threads)
        s3 = {"shadow3_client": s3_client, "shadow3_runtime": s3_rt,
              "shadow3_queries": QuerySet.from_split(s3_run.dataset.inputs, s3_run.dataset.y,
                                                     s3_run.splits.shadow_train, s3_run.splits.shadow_test, samples,
                                                     seed + 2)}
    tq = QuerySet.from_split(t_run.dataset.inputs, t_run.dataset.y, t_run.splits.target_train,
                             t_run.splits.target_test, samples, seed)
    sq = QuerySet.from_split(s_run.dataset.inputs, s_run.dataset.y, s_run.splits.shadow_train,
                             s_run.splits.shadow_test, samples, seed + 1)
    settings = AttackSettings(attacks=names, adversaries=list(adversaries), repeats=repeats, seed=seed,
                              label_only_kind="image" if t_run.dataset.kind == "image" else "tabular",
                              label_only_queries=label_only_queries)
    describe = {"target": target, "shadow": shadow, "target_run": str(target_run), "shadow_run": str(shadow_run),
                "shadow3": shadow3, "shadow3_run": None if shadow3_run is None else str(shadow3_run),
                "arch": t_run.config.arch, "exits": t_run.config.exits, "dataset": t_run.config.dataset,
                "train_accuracy": t_run.metrics["final_exit"]["train_accuracy"],
                "test_accuracy": t_run.metrics["final_exit"]["test_accuracy"]}
    results = run_experiment(t_client, s_client, tq, sq, settings, out_dir, target_runtime=t_rt,
                             shadow_runtime=s_rt, describe=describe, **s3)
    for kind, rep in results["exit_stealing"].items():
        if "accuracy" in rep:
            click.echo(f"exit stealing ({kind}): accuracy {rep['accuracy']:.3f}")
    for adv, block in results["adversaries"].items():
        click.echo(f"adversary {adv} ({block['description']}):")
        for name, m in block["attacks"].items():
            if "error" in m:
                click.echo(f"  {name:<20} skipped: {m['error']}")
            else:
                click.echo(f"  {name:<20} AUC {m['auc']['value']:.3f}  balanced accuracy "
                           f"{m['balanced_accuracy']['value']:.3f}")
    click.echo(f"results written to {out_dir / 'results.json'}")
