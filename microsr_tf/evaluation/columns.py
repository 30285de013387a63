"""The report's columns: key, heading, direction and meaning of every number the evaluation writes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    key: str  # CSV/JSON field name
    heading: str  # table heading in report.md
    direction: str  # "↑" higher is better, "↓" lower is better, "→1" closer to 1 is better, "ref" a yardstick
    group: str  # "shape", "unpaired", "paired" or "uncertainty": when the column is present
    meaning: str
    digits: int = 3


COLUMNS: tuple[Column, ...] = (
    Column("mhum", "m-HuM", "↓", "shape",
           "paper eq. 5: per slice, the smallest Hu-moment distance of its segmented bone to any slice of the HR "
           "set, averaged over slices (default distance OpenCV I1)"),
    Column("lr_psnr", "LR PSNR", "↑", "unpaired",
           "LR consistency: the output averaged back onto the input's LR grid, mapped onto the LR slice by a "
           "per-slice least-squares affine, PSNR (dB) against it", 2),
    Column("lr_ssim", "LR SSIM", "↑", "unpaired", "LR consistency as above, SSIM"),
    Column("grad_w1", "grad W1", "↓", "unpaired",
           "realism: Wasserstein distance between gradient-magnitude distributions over the bone (each volume "
           "normalised to [0, 1] by its own statistics) and the HR set's", 4),
    Column("glcm_w1", "GLCM W1", "↓", "unpaired",
           "realism: Wasserstein distance of GLCM contrast, homogeneity, energy and correlation of 32 px "
           "patches to the HR set's, each over the HR set's std, averaged"),
    Column("sharpness", "sharpness", "→1", "unpaired",
           "edge sharpness: 99th percentile of gradient magnitude over the bone, divided by the HR set's "
           "(below 1 blurrier than micro-CT, above 1 harsher or noisier)"),
    Column("periodic_2px", "periodic 2px", "↓", "unpaired",
           "spectral power at the period-2 frequencies over the median power at the same radius, divided by "
           "the HR set's (1 = as periodic as real micro-CT; checkerboards score high)", 2),
    Column("periodic_4px", "periodic 4px", "↓", "unpaired",
           "the same at the period-4 frequencies (dot lattices from the first x2 upsampling)", 2),
    Column("hum_paired", "HuM paired", "↓", "paired",
           "Hu-moment distance of each slice's segmented bone to the same slice of the aligned HR, averaged"),
    Column("psnr", "PSNR", "↑", "paired",
           "PSNR (dB) against the aligned HR on its raw scale (both mapped by the HR's statistics to [0, 1] "
           "and clipped; data range 1)", 2),
    Column("ssim", "SSIM", "↑", "paired", "SSIM against the aligned HR on the same raw scale"),
    Column("psnr_cal", "PSNR cal", "↑", "paired",
           "PSNR after mapping each slice onto the HR by its least-squares affine (calibration does not count, "
           "structure does)", 2),
    Column("ssim_cal", "SSIM cal", "↑", "paired", "SSIM after the same per-slice affine calibration"),
    Column("unc_spearman", "unc ρ", "↑", "uncertainty",
           "Spearman correlation between predicted std and absolute error (raw scale) near the bone"),
    Column("unc_ause", "AUSE", "↓", "uncertainty",
           "area under the sparsification error (Ilg et al. 2018): 0 when std orders pixels exactly as the error"),
    Column("unc_ause_random", "AUSE random", "ref", "uncertainty",
           "AUSE of a random ordering of the same pixels: an informative uncertainty is well below it"),
    Column("unc_ratio", "RMSE/std", "→1", "uncertainty",
           "observed RMSE over root-mean-square predicted std (above 1: over-confident)", 2),
)

BY_KEY = {c.key: c for c in COLUMNS}
