"""`microsr-tf export`: a trained generator to a versioned SavedModel for TF-Serving."""

from __future__ import annotations

import click

from ._common import user_errors


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="Training run directory or generator .keras file.")
@click.option("--out", "base_dir", required=True, type=click.Path(file_okay=False),
              help="Model base path; the export goes to OUT/<version>/ as TF-Serving expects.")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Version number (default: one more than the highest in OUT).")
@click.option("--samples", type=click.IntRange(min=2), default=100, show_default=True,
              help="Monte Carlo samples of the serving_default signature.")
@user_errors
def command(model_path: str, base_dir: str, version: int | None, samples: int) -> None:
    """Export MODEL as a SavedModel whose signatures return the posterior mean and variance.

    Signatures: serving_default(image) and mc_seeded(image, samples, seed), on normalised slices on
    the HR grid; OUT/<version>/assets.extra/microsr_meta.json carries spacings and intensity statistics.
    """
    from microsr_tf.export import export_saved_model

    target = export_saved_model(model_path, base_dir, version=version, samples=samples)
    click.echo(f"exported {target}")
