"""``microsr-tf phantom``: write synthetic temporal-bone phantoms (unpaired LR/HR sets + a paired test subject)."""

from __future__ import annotations

import click

from ._common import user_errors


@click.command(help=(
    "Write synthetic temporal-bone phantoms to OUT_DIR: N cone-beam-CT-like volumes in lr/ and N micro-CT-like "
    "volumes of other subjects in hr/ (unpaired), one more subject at both resolutions in test/lr and test/hr, "
    "and manifest.json. LR is 8x coarser in-plane only (same slices as HR). 'small' trains on a laptop CPU "
    "(HR 192x192x48 at 0.06 mm); 'paper' uses the paper's voxel sizes (HR 0.018 mm, LR 0.15 mm) on a "
    "cropped 10.8 mm field of view."))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--subjects", "-n", type=click.IntRange(min=1), default=4, show_default=True,
              help="Subjects per unpaired training set.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed, subjects and size give identical files.")
@click.option("--size", type=click.Choice(["small", "paper"]), default="small", show_default=True,
              help="Grid sizes and voxel spacings.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUT_DIR, replacing earlier phantoms.")
@user_errors(tensorflow=False)
def command(out_dir: str, subjects: int, seed: int, size: str, overwrite: bool) -> None:
    from microsr_tf.phantoms import write_phantoms

    write_phantoms(out_dir, subjects, seed, size=size, overwrite=overwrite,
                   progress=lambda message: click.echo(message, err=True))
