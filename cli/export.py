"""`microsr-tf export`: a trained generator to a versioned SavedModel for TF-Serving."""

from __future__ import annotations

import click

from microsr_tf.config import MAX_SERVED_SAMPLES as MAX_SAMPLES

from ._common import FiniteFloat, user_errors

MAX_VERSION = 2**63 - 1  # TF-Serving reads version folders as int64


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="Training run directory or generator .keras file.")
@click.option("--out", "base_dir", required=True, type=click.Path(),
              help="Model base path; the export goes to OUT/<version>/ as TF-Serving expects.")
@click.option("--version", type=click.IntRange(min=1, max=MAX_VERSION), default=None,
              help="Version number (default: one more than the highest in OUT).")
@click.option("--samples", type=click.IntRange(min=2, max=MAX_SAMPLES), default=100, show_default=True,
              help=f"Monte Carlo samples of the serving_default signature (at most {MAX_SAMPLES}).")
@click.option("--max-pixels", type=click.IntRange(min=16), default=4096 * 4096, show_default=True,
              help="Most HR pixels (images x height x width) one request may hold; larger ones are refused.")
@click.option("--memory-budget-mb", type=FiniteFloat(min=0, min_open=True), default=1024.0, show_default=True,
              help="Memory the server may use for the Monte Carlo passes it runs at once.")
@user_errors
def command(model_path: str, base_dir: str, version: int | None, samples: int, max_pixels: int,
            memory_budget_mb: float) -> None:
    """Export MODEL as a SavedModel whose signatures return the posterior mean and variance.

    Signatures: serving_default(image) and mc_seeded(image, samples, seed) on normalised slices on the
    HR grid, mc_scanner(lr_image, spacing, samples, seed) on LR slices in scanner units (when the model
    stores its LR statistics), and metadata(probe); OUT/<version>/assets.extra/microsr_meta.json
    carries spacings, intensity statistics and limits. The stock tensorflow_model_server runs it with
    its default flags.
    """
    from microsr_tf.export import export_saved_model, scanner_note

    target = export_saved_model(model_path, base_dir, version=version, samples=samples, max_pixels=max_pixels,
                                memory_budget_mb=memory_budget_mb)
    note = scanner_note(target)
    if note:
        click.echo(f"note: {note}", err=True)
    click.echo(f"exported {target}")
