"""`microsr-tf demo`: the whole job on a bundled default, in about a minute on a laptop CPU."""

from __future__ import annotations

import click

from ._common import user_errors


@click.command()
@click.option("--out", "out_dir", default="microsr-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the phantom, mean/variance volumes, preview PNG and report.json go.")
@click.option("--model", default=None, type=click.Path(),
              help="Model to use instead of the bundled one (run dir, .keras or SavedModel).")
@click.option("--samples", "-T", type=click.IntRange(min=2), default=100, show_default=True,
              help="Monte Carlo dropout samples (the paper's T).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the phantom subject and of the dropout masks.")
@click.option("--overwrite", is_flag=True, help="Reuse a non-empty output directory.")
@user_errors
def command(out_dir: str, model: str | None, samples: int, seed: int, overwrite: bool) -> None:
    """Phantom CT -> super-resolved mean + uncertainty -> scored against its micro-CT twin."""
    from microsr_tf.demo import run_demo

    report = run_demo(out_dir, model=model, samples=samples, seed=seed, overwrite=overwrite,
                      say=lambda message: click.echo(message, err=True))
    for line in report.lines():
        click.echo(line)
