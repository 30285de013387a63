"""``microsr-tf phantom``: write synthetic temporal-bone phantoms (unpaired LR/HR sets + a paired test subject)."""

from __future__ import annotations

import click

from microsr_tf.phantoms import PROFILES, SIZES, write_phantoms

from ._common import user_errors


def _profile_lines() -> str:
    return "; ".join(f"{name}{' (held out)' if p.held_out else ''}" for name, p in PROFILES.items())


@click.command(help=(
    "Write synthetic temporal-bone phantoms to OUT_DIR: N cone-beam-CT-like volumes in lr/ and N micro-CT-like "
    "volumes of other subjects in hr/ (unpaired), one more subject at both resolutions in test/lr and test/hr, "
    "the same test subject scanned by each test profile in test/lr-PROFILE/, and manifest.json (which profile "
    "and parameters made each file). LR is 8x coarser in-plane only (same slices as HR). 'small' trains on a "
    "laptop CPU (HR 192x192x48 at 0.06 mm, anatomy at 0.6 scale); 'adult' keeps those voxel sizes with adult "
    "anatomy on a 23 mm field of view (HR 384x384x64, LR 48x48x64); 'paper' uses the paper's voxel sizes "
    "(HR 0.018 mm, LR 0.15 mm) on a cropped 10.8 mm field of view. Scanner profiles: " + _profile_lines() + "."))
@click.argument("out_dir", type=click.Path(path_type=str))  # a file there: refused by the command, exit 1
@click.option("--subjects", "-n", type=click.IntRange(min=1), default=4, show_default=True,
              help="Subjects per unpaired training set.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed, subjects, size and profiles give identical files.")
@click.option("--size", type=click.Choice(list(SIZES)), default="small", show_default=True,
              help="Grid sizes, voxel spacings and anatomy scale.")
@click.option("--lr-profiles", metavar="PROFILES", default=None,
              help="Scanner profiles of the training LR set, taken in turn by the subjects: comma-separated "
                   "names, or 'train' (all training profiles). Default: the size's own ('small', 'paper': "
                   "cbct-standard; 'adult': train).")
@click.option("--test-profiles", metavar="PROFILES", default="all", show_default=True,
              help="Profiles that also scan the test subject into test/lr-PROFILE/: comma-separated names, "
                   "'all', 'held-out', 'train' or 'none'.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUT_DIR, replacing earlier phantoms.")
@user_errors(tensorflow=False)
def command(out_dir: str, subjects: int, seed: int, size: str, lr_profiles: str | None, test_profiles: str,
            overwrite: bool) -> None:
    write_phantoms(out_dir, subjects, seed, size=size, overwrite=overwrite, lr_profiles=lr_profiles,
                   test_profiles=test_profiles, progress=lambda message: click.echo(message, err=True))
