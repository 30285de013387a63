"""`microsr-tf demo`: the whole job on a bundled default: phantom, prediction, evaluation."""

from __future__ import annotations

import click

from microsr_tf.config import MAX_SAMPLES

from ._common import user_errors


@click.command()
@click.option("--out", "out_dir", default="microsr-demo", show_default=True, type=click.Path(),
              help="Where the phantom, prediction (mean, variance, preview), evaluation report and report.json go.")
@click.option("--model", default=None, type=click.Path(),
              help="Model to use instead of the bundled one (run dir, .keras or SavedModel).")
@click.option("--samples", "-T", type=click.IntRange(min=2, max=MAX_SAMPLES), default=100, show_default=True,
              help="Monte Carlo dropout samples (the paper's T).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the phantom subject and of the dropout masks.")
@click.option("--slices", type=click.IntRange(min=1), default=8, show_default=True,
              help="Central slices of the phantom scan to predict and evaluate.")
@click.option("--overwrite", is_flag=True, help="Reuse a non-empty output directory.")
@user_errors
def command(out_dir: str, model: str | None, samples: int, seed: int, slices: int, overwrite: bool) -> None:
    """Phantom CT -> super-resolved mean + uncertainty -> evaluated against its micro-CT twin."""
    from microsr_tf.demo import run_demo

    report = run_demo(out_dir, model=model, samples=samples, seed=seed, slices=slices, overwrite=overwrite,
                      say=lambda message: click.echo(message, err=True))
    for line in report.lines():
        click.echo(line)
