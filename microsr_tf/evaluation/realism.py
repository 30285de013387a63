"""Realism without a truth: how far the local statistics of generated slices are from real micro-CT.

Two families of local statistics are gathered over the bony structure (the segmentation mask grown by two
pixels, so both sides of each edge count), on intensities that each volume normalises to [0, 1] with its
own foreground statistics (so calibration does not count, texture and edges do):

* **gradient magnitude** per pixel: blur shortens its upper tail, noise and hallucinated texture fatten
  its bulk; its 99th percentile is the edge sharpness.
* **GLCM texture** (``skimage.feature.graycomatrix``) of 32x32 patches quantised to 32 levels, at one
  pixel offset along both axes: Haralick's contrast, homogeneity, energy and correlation, which together
  describe how grey values co-occur (noise, smoothness, regularity, structure).

Distributions are compared with the 1-D Wasserstein distance (``scipy.stats.wasserstein_distance``): it
needs no binning, stays finite for distributions that do not overlap (unlike KL), and is in the units of
the statistic. The four GLCM properties have different units, so each distance is divided by the HR set's
standard deviation of that property before they are averaged. Learned feature distances (FID/KID) are
not used: they need ImageNet weights, which cannot be downloaded here, and describe natural photographs.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation
from scipy.stats import wasserstein_distance
from skimage.feature import graycomatrix, graycoprops

GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
GLCM_PATCH = 32  # pixels on a side
GLCM_LEVELS = 32  # grey levels after quantising [0, 1]
GLCM_ANGLES = (0.0, np.pi / 2)
MASK_GROW = 2  # pixels the segmentation is grown by so both sides of an edge are sampled
SHARPNESS_PERCENTILE = 99.0


def gradient_magnitude(u: np.ndarray) -> np.ndarray:
    """Per-pixel gradient magnitude (central differences, intensity units per pixel)."""
    gy, gx = np.gradient(np.asarray(u, np.float64))
    return np.hypot(gy, gx)


def structure_region(mask: np.ndarray) -> np.ndarray:
    """The segmentation grown by ``MASK_GROW`` pixels: where local statistics are sampled."""
    return binary_dilation(mask, iterations=MASK_GROW) if mask.any() else mask


def gradient_samples(u: np.ndarray, region: np.ndarray, rng: np.random.Generator, limit: int) -> np.ndarray:
    """Up to ``limit`` gradient magnitudes drawn without replacement from ``region``."""
    values = gradient_magnitude(u)[region]
    if values.size > limit:
        values = rng.choice(values, size=limit, replace=False)
    return values.astype(np.float32)


def glcm_features(u: np.ndarray, region: np.ndarray, rng: np.random.Generator, max_patches: int = 8,
                  patch: int = GLCM_PATCH, min_fraction: float = 0.5) -> np.ndarray:
    """``[n, 4]`` GLCM properties (``GLCM_PROPS``, averaged over both angles) of up to ``max_patches``
    patches on a ``patch``-pixel grid that lie at least ``min_fraction`` inside ``region``."""
    q = np.clip(np.round(np.asarray(u, np.float64) * (GLCM_LEVELS - 1)), 0, GLCM_LEVELS - 1).astype(np.uint8)
    h, w = q.shape
    origins = [(r, c) for r in range(0, h - patch + 1, patch) for c in range(0, w - patch + 1, patch)
               if region[r:r + patch, c:c + patch].mean() >= min_fraction]
    if len(origins) > max_patches:
        origins = [origins[i] for i in sorted(rng.choice(len(origins), size=max_patches, replace=False))]
    rows = []
    for r, c in origins:
        glcm = graycomatrix(q[r:r + patch, c:c + patch], distances=[1], angles=list(GLCM_ANGLES),
                            levels=GLCM_LEVELS, symmetric=True, normed=True)
        rows.append([float(graycoprops(glcm, prop).mean()) for prop in GLCM_PROPS])
    feats = np.asarray(rows, np.float64).reshape(-1, len(GLCM_PROPS))
    return feats[np.isfinite(feats).all(axis=1)]


def distribution_distance(samples: np.ndarray, reference: np.ndarray) -> float:
    """Wasserstein-1 distance between two 1-D samples (NaN if either is empty)."""
    samples, reference = np.ravel(samples), np.ravel(reference)
    if samples.size == 0 or reference.size == 0:
        return float("nan")
    return float(wasserstein_distance(samples, reference))


def glcm_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean over the GLCM properties of their Wasserstein distance divided by the reference's std."""
    features = np.asarray(features, np.float64).reshape(-1, len(GLCM_PROPS))
    reference = np.asarray(reference, np.float64).reshape(-1, len(GLCM_PROPS))
    if len(features) == 0 or len(reference) < 2:
        return float("nan")
    spread = reference.std(axis=0)
    terms = [distribution_distance(features[:, p], reference[:, p]) / spread[p]
             for p in range(len(GLCM_PROPS)) if spread[p] > 0]
    return float(np.mean(terms)) if terms else float("nan")


def edge_sharpness(gradients: np.ndarray) -> float:
    """The 99th percentile of gradient magnitude (NaN for no samples)."""
    gradients = np.ravel(gradients)
    return float(np.percentile(gradients, SHARPNESS_PERCENTILE)) if gradients.size else float("nan")
