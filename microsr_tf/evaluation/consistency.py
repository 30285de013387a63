"""LR consistency: degrade a super-resolved slice back onto the input's LR grid and compare with the input.

Works without any truth, so it applies to real clinical scans: an output that invents anatomy the scanner
could not have blurred away, or drops anatomy it did see, no longer reproduces the LR slice. The output is
averaged over the exact footprint of each LR voxel (area downsampling at the true spacing ratio, which may
be fractional, e.g. 0.15 / 0.018 = 8.33; the grids share their outer edge as in
:func:`microsr_tf.volumes.resampled_affine`), optionally after a Gaussian point spread function. The LR
scan and the output are in different units (HU against micro-CT grey values), so the degraded output is
mapped onto the LR slice by a per-slice least-squares affine before PSNR/SSIM: the score measures
structure, not calibration.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from ..preprocessing import area_matrix
from .fidelity import calibrate, psnr, ssim

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def degrade(fine: np.ndarray, factors: Sequence[float], lr_shape: Sequence[int], psf_fwhm: float = 0.0) -> np.ndarray:
    """A fine slice averaged onto the LR grid of ``lr_shape`` (``factors`` = LR / fine spacing).

    ``psf_fwhm`` (in LR voxels) first blurs with a Gaussian point spread function of that full width at
    half maximum; 0 means pure area averaging.
    """
    img = np.asarray(fine, np.float64)
    f0, f1 = (float(f) for f in factors)
    if psf_fwhm > 0:
        img = gaussian_filter(img, sigma=(psf_fwhm * f0 / FWHM_PER_SIGMA, psf_fwhm * f1 / FWHM_PER_SIGMA),
                              mode="nearest")
    a0 = area_matrix(int(lr_shape[0]), img.shape[0], f0)
    a1 = area_matrix(int(lr_shape[1]), img.shape[1], f1)
    return np.asarray(a0 @ (a1 @ img.T).T)


def lr_consistency(fine: np.ndarray, lr: np.ndarray, factors: Sequence[float], psf_fwhm: float = 0.0,
                   data_range: float = 1.0) -> dict[str, float]:
    """``lr_psnr``/``lr_ssim`` of the degraded ``fine`` slice, affinely calibrated onto ``lr``.

    ``lr`` should be on a scale where ``data_range`` spans its intensities (the evaluation passes the LR
    slice normalised to [0, 1] by its volume's statistics); ``fine`` may be in any units.
    """
    lr = np.asarray(lr, np.float64)
    low = calibrate(degrade(fine, factors, lr.shape, psf_fwhm), lr)
    return {"lr_psnr": psnr(low, lr, data_range), "lr_ssim": ssim(low, lr, data_range)}
