"""``microsr-tf evaluate``: score predictions against bicubic upsampling and real micro-CT, into a report folder."""

from __future__ import annotations

import math
import time

import click

from ._common import FiniteFloat, option_values, user_errors


@click.command("evaluate")
@click.option("--lr", "lr_path", required=True, metavar="LR.nii[.gz]", help="The LR scan the predictions were made from.")
@click.option("--hr-dir", required=True, metavar="DIR",
              help="Real HR (micro-CT) volumes at the predictions' pixel size: the reference for m-HuM and realism.")
@click.option("--pred", "pred_specs", multiple=True, required=True, metavar="NAME=DIR",
              help="A method's name and the folder `microsr-tf predict` wrote for LR (LR_mean.nii.gz and, if "
                   "present, LR_var.nii.gz). Repeat for several methods; bicubic is always added.")
@click.option("--paired-hr", default=None, metavar="HR.nii[.gz]",
              help="An HR volume aligned voxel for voxel with the predictions' grid (for example a phantom's "
                   "test subject): adds PSNR/SSIM, paired HuM and uncertainty quality.")
@click.option("--out", "out_dir", required=True, metavar="REPORT_DIR",
              help="Folder for report.md, metrics.csv, metrics.json and the PNG figures (created atomically).")
@click.option("--model", default=None, metavar="PATH",
              help="The model that made the predictions (run dir, .keras or SavedModel): bicubic is then mapped to "
                   "HR units with its HR statistics, exactly as predict maps. Default: the HR set's statistics.")
@click.option("--normalize", type=click.Choice(["volume", "model"]), default="volume", show_default=True,
              help="How predict normalised the LR scan (its --normalize), so bicubic gets the same mapping; "
                   "'model' needs --model.")
@click.option("--hu-distance", type=click.Choice(["I1", "I2", "I3"]), default="I1", show_default=True,
              help="OpenCV matchShapes distance between log-scaled Hu moments (see README: Evaluation).")
@click.option("--threshold", type=FiniteFloat(), default=None,
              help="Bone threshold in HR units for the Hu-moment segmentation. Default: Otsu per volume.")
@click.option("--lr-psf-fwhm", type=FiniteFloat(min=0, max=10), default=0.0, show_default=True,
              help="Scanner point spread function (FWHM in LR voxels) applied before averaging an output back "
                   "onto the LR grid for LR consistency; 0 = area averaging only.")
@click.option("--axis", type=click.IntRange(-3, 2), default=-1, show_default=True,
              help="Slice axis of every volume (0, 1, 2; -1 the last).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the pixel subsamples and of the random sparsification ordering.")
@click.option("--overwrite", is_flag=True, help="Replace a report folder that already holds files.")
@user_errors
def command(lr_path, hr_dir, pred_specs, paired_hr, out_dir, model, normalize, hu_distance, threshold, lr_psf_fwhm, axis,
            seed, overwrite) -> None:
    """Evaluate super-resolved volumes: one row per method (bicubic always), m-HuM, LR consistency, realism,
    periodic artefacts, paired PSNR/SSIM and uncertainty quality when an aligned HR is given."""
    from microsr_tf.evaluation import Settings, parse_predictions, plan_evaluation, run_and_write
    from microsr_tf.evaluation.evaluate import stale_report_folders

    with option_values():
        settings = Settings(axis=axis, hu_method=hu_distance, threshold=threshold, lr_psf_fwhm=lr_psf_fwhm,
                            seed=seed).validate()
        predictions = parse_predictions(pred_specs)
    plan = plan_evaluation(lr_path, hr_dir, predictions, out_dir, paired_hr=paired_hr, model=model, axis=axis,
                           overwrite=overwrite, normalize=normalize)
    stale = stale_report_folders(out_dir)
    if stale:
        click.echo(f"note: {len(stale)} temporary folder(s) of an interrupted run are ignored and can be deleted: "
                   f"{', '.join(stale)}", err=True)
    start = time.perf_counter()
    evaluation, files = run_and_write(plan, settings, progress=lambda message: click.echo(message, err=True))
    cols = evaluation.columns
    width = max(len(r.name) for r in evaluation.rows)
    click.echo(" " * width + "  " + "  ".join(f"{c.heading + ' ' + c.direction:>12}" for c in cols))
    for row in evaluation.rows:
        cells = []
        for c in cols:
            v = row.values.get(c.key, math.nan)
            cells.append(f"{'—' if math.isnan(v) else format(v, f'.{c.digits}f'):>12}")
        click.echo(f"{row.name:<{width}}  " + "  ".join(cells))
    click.echo(f"wrote {len(files)} files to {out_dir} in {time.perf_counter() - start:.1f} s (report.md explains "
               "every column)")
