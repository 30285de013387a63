"""Periodic artefacts: spectral power at the periods the generator's two x2 upsamplings can imprint.

A transposed convolution (or any x2 upsampling whose kernel does not tile evenly) leaves a pattern that
repeats every 2 output pixels after the last upsampling and every 4 after the first: checkerboards and
dot lattices. In the power spectrum of a slice they are peaks at the frequencies whose components are
multiples of 1/4 cycle per pixel: period 2 at (1/2, 0), (0, 1/2), (1/2, 1/2); period 4 at the other
twelve non-zero points of the 1/4 lattice. A slice's score for each period is the mean, over those peak
frequencies, of the power there divided by the median power at the same radial frequency (an annulus
1.5 bins either side of the peak's radius, leaving out the neighbourhood of every lattice point, widened
until it holds at least 32 frequencies: the corner (1/2, 1/2) has few at its radius): about 1.4 for a spectrum without peaks (mean over
median of an exponential variate is 1 / ln 2), far more for an imprinted pattern. The evaluation reports
it relative to the same measure on the real HR set, so 1 means "as periodic as real micro-CT".
"""

from __future__ import annotations

import numpy as np

MIN_SIDE = 16  # pixels; a smaller slice has too few frequencies to estimate an annulus median
ANNULUS_HALF_WIDTH = 1.5  # frequency bins on either side of a peak's radius
MIN_REFERENCE = 32  # frequencies the annulus must hold; it widens bin by bin until it does
POWER_FLOOR = 1e-10  # reference power never below this share of the mean power: round-off is not signal
LATTICE_GUARD = 2  # bins around each lattice point left out of the reference (Hann main lobe)


def _lattice_bins(h: int, w: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """FFT indices of the period-2 and period-4 peaks of an ``h x w`` spectrum (both multiples of 4)."""
    qy, qx = (0, h // 4, h // 2, 3 * h // 4), (0, w // 4, w // 2, 3 * w // 4)
    period2, period4 = [], []
    for ky in qy:
        for kx in qx:
            if ky == 0 and kx == 0:
                continue
            quarter = ky in (h // 4, 3 * h // 4) or kx in (w // 4, 3 * w // 4)
            (period4 if quarter else period2).append((ky, kx))
    return period2, period4


def power_spectrum(u: np.ndarray) -> np.ndarray:
    """Hann-windowed power spectrum of the centred crop of ``u`` to sides divisible by 4 (FFT order)."""
    u = np.asarray(u, np.float64)
    h, w = (u.shape[0] // 4) * 4, (u.shape[1] // 4) * 4
    y0, x0 = (u.shape[0] - h) // 2, (u.shape[1] - w) // 2
    crop = u[y0:y0 + h, x0:x0 + w]
    window = np.outer(np.hanning(h), np.hanning(w))
    return np.abs(np.fft.fft2((crop - crop.mean()) * window)) ** 2


def periodic_scores(u: np.ndarray) -> dict[str, float]:
    """``{"2px": score, "4px": score}`` of one slice (NaN when the slice is too small or flat)."""
    u = np.asarray(u, np.float64)
    if min(u.shape) < MIN_SIDE:
        return {"2px": float("nan"), "4px": float("nan")}
    power = power_spectrum(u)
    h, w = power.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    radius = np.hypot(fy, fx)
    period2, period4 = _lattice_bins(h, w)
    iy = np.arange(h)[:, None]
    ix = np.arange(w)[None, :]
    near_lattice = np.zeros((h, w), bool)
    for ky, kx in period2 + period4 + [(0, 0)]:
        dy = np.minimum(np.abs(iy - ky), h - np.abs(iy - ky))
        dx = np.minimum(np.abs(ix - kx), w - np.abs(ix - kx))
        near_lattice |= (dy <= LATTICE_GUARD) & (dx <= LATTICE_GUARD)
    free_power, free_radius = power[~near_lattice], radius[~near_lattice]
    bin_width = 1.0 / min(h, w)
    floor = POWER_FLOOR * float(power.mean())
    scores = {}
    for key, peaks in (("2px", period2), ("4px", period4)):
        ratios = []
        for ky, kx in peaks:
            offset = np.abs(free_radius - radius[ky, kx])
            half_width = ANNULUS_HALF_WIDTH
            while np.count_nonzero(offset <= half_width * bin_width) < MIN_REFERENCE and half_width < min(h, w):
                half_width += 1.0
            ring = offset <= half_width * bin_width
            reference = max(float(np.median(free_power[ring])) if ring.any() else 0.0, floor)
            if reference > 0:
                ratios.append(power[ky, kx] / reference)
        scores[key] = float(np.mean(ratios)) if ratios else float("nan")
    return scores
