"""``mexit train``: train a multi-exit model and search its early-exit threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command("train")
@click.option("--dataset", required=True, help="Dataset name: cifar10, cifar100, tinyimagenet, purchase, texas, "
              "location or digits (embedded, no download).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Directory holding the dataset files (not needed for digits).")
@click.option("--arch", required=True, help="Backbone: vgg16, resnet56, mobilenetv2, wrn32-4, fcn18-1..fcn18-4.")
@click.option("--exits", type=int, default=6, show_default=True, help="Number of exits, 1 (vanilla) to 6.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default: per dataset).")
@click.option("--lr", type=float, default=None, help="Learning rate (default 1e-3 for Adam, 0.1 for SGD).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--weighting", type=click.Choice(["sum", "sdn"]), default="sum", show_default=True,
              help="Loss over exits: plain sum, or the SDN weight ramp.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--role", type=click.Choice(["target", "shadow"]), default="target", show_default=True,
              help="Train on the target or the shadow split.")
@click.option("--limit", type=int, default=None,
              help="Use at most this many samples per split (quick runs on CPU).")
@click.option("--subset", type=click.Choice(["all", "class-skewed"]), default="all", show_default=True,
              help="'class-skewed': train on a subset of the role's split with a skewed class prior (half of "
              "the classes keep a quarter of their samples), so a shadow's data are distributed differently "
              "from the target's (adversary 3 with other data, paper Fig. 18).")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Accuracy drop allowed when searching the early-exit threshold.")
@click.option("--tau-rule", type=click.Choice(["vanilla", "final-exit"]), default=None,
              help="How the early-exit threshold is picked: 'vanilla' (the paper's: within --tolerance of the vanilla "
              "model's validation accuracy; needs --vanilla-run) or 'final-exit' (of this model's own last exit). "
              "Default: vanilla when --vanilla-run is given, else final-exit.")
@click.option("--vanilla-run", type=click.Path(path_type=Path), default=None,
              help="Finished 1-exit run (same --arch and --dataset) whose validation accuracy the vanilla rule uses.")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: all cores).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
def command(out_dir: Path, tau_rule: str | None, vanilla_run: Path | None, **kwargs: Any) -> None:
    """Train a multi-exit model jointly and search its early-exit threshold."""
    from mexit.train.runner import make_config, train_run

    config = make_config(**kwargs)
    result = train_run(config, out_dir, tau_rule=tau_rule, vanilla_run=vanilla_run)
    acc = result["final_exit"]
    tau = result["threshold"]
    click.echo(
        f"trained {config.arch} ({config.exits} exits) on {config.dataset}: final-exit test accuracy "
        f"{acc['test_accuracy']:.4f} (train {acc['train_accuracy']:.4f})"
    )
    for row in result["per_exit"]:
        click.echo(
            f"  exit {row['exit']}: test {row['test_accuracy']:.4f}  train {row['train_accuracy']:.4f}  "
            f"FLOPs {row['flops']:,} ({row['flops_fraction']:.2f})"
        )
    rule = tau.get("rule", "final-exit")
    ref = "vanilla model" if rule == "vanilla" else "final exit"
    click.echo(
        f"threshold tau={tau['tau']:.2f} ({rule} rule): validation accuracy {tau['accuracy']:.4f} "
        f"({ref} {tau['reference_accuracy']:.4f}) at {tau['flops_fraction']:.2f} of full-depth FLOPs"
        + ("" if tau.get("within_tolerance", True) else "; no tau was within the tolerance, the most accurate is used")
    )
    dep = result.get("deployed")
    if dep:
        click.echo(f"deployed at tau={dep['tau']:.2f}: members (train) {dep['train_accuracy']:.4f}, non-members "
                   f"(test) {dep['test_accuracy']:.4f} (final exit {acc['train_accuracy']:.4f} / "
                   f"{acc['test_accuracy']:.4f})")
    click.echo(f"run written to {out_dir}")


