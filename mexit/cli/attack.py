"""``mexit attack``: attack a deployed multi-exit model through its outputs and its response times."""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_ATTACKS = ("score", "score-hybrid", "loss", "loss-hybrid", "confidence", "confidence-hybrid", "exit-only")


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
              help="Queries per sample (latency repeats); the shadow is always queried this often.")
@click.option("--query-budget", type=float, default=None, metavar="N",
              help="Query the target adaptively: N queries per sample on average, spent on the samples whose exit "
                   "is still uncertain under the timing model fitted on the shadow (1..200).")
@click.option("--stealer", default="chosen", show_default=True,
              help="Adversary 2's exit stealer: chosen (by cross-validation on the shadow's timings), likelihood, "
                   "supervised, supervised-gbt, nearest, kde, kde-blind.")
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
            adversaries: tuple[int, ...], samples: int, repeats: int, query_budget: float | None, stealer: str,
            label_only_queries: int, seed: int, threads: int,
            data_root: Path | None, out_dir: Path) -> None:
    """Query TARGET and SHADOW, steal exits from latency, run original and hybrid membership attacks."""
    from mexit.attacks.flow import attack_deployments

    names = [a.strip() for a in attacks.split(",") if a.strip()]
    results = attack_deployments(
        target=target, target_run=target_run, shadow=shadow, shadow_run=shadow_run, out=out_dir,
        attacks=names, adversaries=list(adversaries), samples=samples, repeats=repeats, seed=seed,
        query_budget=query_budget, stealer=stealer,
        label_only_queries=label_only_queries, threads=threads, data_root=data_root, expose=expose,
        expose_exit=expose_exit, target_model=target_model, shadow_model=shadow_model, target_bundle=target_bundle,
        shadow_bundle=shadow_bundle, shadow3=shadow3, shadow3_run=shadow3_run, shadow3_model=shadow3_model,
        shadow3_bundle=shadow3_bundle)
    stealing = results["exit_stealing"]
    for kind, rep in stealing["stealers"].items():
        if "accuracy" in rep:
            click.echo(f"exit stealing ({kind}): accuracy {rep['accuracy']:.3f} (chance {rep['chance']:.3f}), "
                       f"balanced {rep['balanced_accuracy']:.3f} (chance {rep['balanced_chance']:.3f})")
    click.echo(f"adversary 2 steals with: {stealing['chosen']} (picked on its own shadow's timings)")
    for adv, block in results["adversaries"].items():
        click.echo(f"adversary {adv} ({block['description']}):")
        for name, m in block["attacks"].items():
            if "error" in m:
                click.echo(f"  {name:<20} skipped: {m['error']}")
            else:
                click.echo(f"  {name:<20} AUC {m['auc']['value']:.3f}  balanced accuracy "
                           f"{m['balanced_accuracy']['value']:.3f}")
    click.echo(f"results written to {out_dir / 'results.json'}")
