"""``microsr-tf rating-study``: a blinded rating page for raters, and the report of their CSVs (paper Fig. 3)."""

from __future__ import annotations

import click

from ._common import option_values, user_errors


@click.group("rating-study")
def command() -> None:
    """Blinded visual rating of super-resolution methods, as in the paper's Fig. 3.

    `make` writes one self-contained HTML page for the raters plus key.json (keep it: it unblinds the
    ratings); `report` turns the raters' exported CSVs into boxplots and Wilcoxon tests.
    """


@command.command("make")
@click.option("--lr", "lr_path", required=True, metavar="LR.nii[.gz]",
              help="The clinical (low-resolution) scan the methods were run on.")
@click.option("--method", "methods", multiple=True, required=True, metavar="NAME=DIR",
              help="A method to rate and the folder `microsr-tf predict` wrote for LR (it holds "
                   "<LR name>_mean.nii.gz). Repeat for each method; every method must cover the same grid.")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="New folder for study.html (send it to the raters) and key.json (keep it).")
@click.option("--slices", "n_slices", type=click.IntRange(min=1), default=10, show_default=True,
              help="Slices per method, evenly spread over the predicted volume; trials = slices x methods.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random trial order.")
@user_errors
def make(lr_path: str, methods: tuple[str, ...], out_dir: str, n_slices: int, seed: int) -> None:
    """Write a blinded rating page: LR slice left, one method's result right, trials in random order."""
    from microsr_tf.evaluation.rating_study import make_study, parse_method_names

    with option_values():
        parse_method_names(methods)
    result = make_study(lr_path, methods, out_dir, n_slices=n_slices, seed=seed,
                        progress=lambda message: click.echo(message, err=True))
    click.echo(f"study {result.study_id}: {result.n_trials} trials (slices {', '.join(map(str, result.slices))})")
    click.echo(f"wrote {result.page} ({result.page_bytes / 1e6:.1f} MB): send only this file to the raters")
    click.echo(f"wrote {result.key}: keep it; `microsr-tf rating-study report` needs it to unblind the ratings")


@command.command("report")
@click.argument("csv_files", nargs=-1, required=True, metavar="RATINGS.csv...")
@click.option("--key", "key_path", required=True, metavar="KEY.json", help="key.json written by `make`.")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Folder for report.md, summary.csv, pairwise.csv and boxplots.png.")
@click.option("--overwrite", is_flag=True, help="Replace a report already in DIR.")
@user_errors
def report(csv_files: tuple[str, ...], key_path: str, out_dir: str, overwrite: bool) -> None:
    """Unblind and combine raters' CSVs: boxplots per method and criterion, Wilcoxon rank-sum and
    signed-rank tests between every pair of methods, with rank-biserial effect sizes."""
    from microsr_tf.evaluation.rating_report import make_report

    for path in make_report(csv_files, key_path, out_dir, overwrite=overwrite).values():
        click.echo(f"wrote {path}")
