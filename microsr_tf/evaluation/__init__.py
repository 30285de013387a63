"""Evaluation, the last stage of the data's path: how good are super-resolved volumes, with or without a truth.

Metric modules work on 2-D numpy slices (one concept each): :mod:`.shape` (Hu moments, m-HuM),
:mod:`.fidelity` (paired PSNR/SSIM, raw and affinely calibrated), :mod:`.consistency` (LR consistency),
:mod:`.realism` (local-statistic distributions, edge sharpness), :mod:`.periodic` (checkerboard and dot
artefacts) and :mod:`.uncertainty` (Spearman, calibration, sparsification/AUSE). :mod:`.engine` runs them
over whole volumes slice by slice, :mod:`.report` and :mod:`.plots` write the results, and
:mod:`.evaluate` does it all from the files ``microsr-tf predict`` writes.

Typical use::

    from microsr_tf.evaluation import evaluate_files, evaluate_arrays, Settings
    evaluation, files = evaluate_files("scan.nii.gz", "hr_set/", {"cyclegan": "pred/"}, "report/",
                                       paired_hr="scan_hr.nii.gz")
    evaluation.table()   # one dict per row: method, kind, and every column
"""

from .columns import COLUMNS, Column
from .engine import BICUBIC, HELD_OUT, TRUTH, Candidate, Evaluation, Row, Settings, evaluate, evaluate_arrays
from .evaluate import evaluate_files, parse_predictions, plan_evaluation, run_and_write, run_plan
from .report import write_report

__all__ = [
    "BICUBIC", "COLUMNS", "HELD_OUT", "TRUTH", "Candidate", "Column", "Evaluation", "Row", "Settings", "evaluate",
    "evaluate_arrays", "evaluate_files", "parse_predictions", "plan_evaluation", "run_and_write", "run_plan",
    "write_report",
]
