"""Each evaluation metric against hand-computed values, known shapes and independent formulations."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, uniform_filter

from microsr_tf.evaluation.consistency import degrade, lr_consistency
from microsr_tf.preprocessing import area_matrix
from microsr_tf.evaluation.fidelity import affine_fit, paired_scores, psnr, ssim
from microsr_tf.evaluation.periodic import periodic_scores
from microsr_tf.evaluation.realism import (distribution_distance, edge_sharpness, glcm_distance, glcm_features,
                                           gradient_magnitude)
from microsr_tf.evaluation.shape import has_shape, hu_distance, hu_moments, m_hum, min_hu_distances
from microsr_tf.evaluation.uncertainty import (calibration_curve, rmse_ratio, sparsification, spearman)
from microsr_tf.preprocessing import resample_slice

CV_METHODS = {"I1": cv2.CONTOURS_MATCH_I1, "I2": cv2.CONTOURS_MATCH_I2, "I3": cv2.CONTOURS_MATCH_I3}


def disc(size=256, radius=40.0, centre=None) -> np.ndarray:
    cy, cx = centre or (size / 2, size / 2)
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def transformed(mask: np.ndarray, angle: float, scale: float, shift=(0.0, 0.0)) -> np.ndarray:
    """Rotate by ``angle`` degrees and scale about the centre, then shift (nearest neighbour)."""
    h, w = mask.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += shift
    return cv2.warpAffine(mask.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST).astype(bool)


def ellipse(size=256, axes=(60, 25), angle=0.0) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    cv2.ellipse(img, (size // 2, size // 2), axes, angle, 0, 360, 1, -1)
    return img.astype(bool)


def blobs(size=256) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    cv2.fillPoly(img, [np.array([[30, 40], [200, 60], [120, 110], [70, 220]])], 1)
    cv2.circle(img, (200, 200), 20, 1, -1)
    return img.astype(bool)


# ---------------------------------------------------------------------------------------------- shape


@pytest.mark.parametrize("method", ["I1", "I2", "I3"])
def test_hu_distance_equals_opencv_match_shapes(method):
    shapes = [disc(), ellipse(), blobs(), transformed(blobs(), 30, 0.7), ellipse(axes=(80, 10), angle=20)]
    for a in shapes:
        for b in shapes:
            expected = cv2.matchShapes(a.astype(np.uint8), b.astype(np.uint8), CV_METHODS[method], 0)
            assert hu_distance(hu_moments(a), hu_moments(b), method) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_disc_rotated_and_scaled_is_near_zero_and_a_square_is_clearly_farther():
    d = disc(radius=40)
    moved = transformed(d, angle=37, scale=1.6, shift=(-10, 15))
    square = np.zeros_like(d)
    square[88:168, 88:168] = True
    near = hu_distance(hu_moments(d), hu_moments(moved))
    far = hu_distance(hu_moments(d), hu_moments(square))
    # By hand: only h1 survives OpenCV's 1e-5 cut-off for both; h1 = 1/(2 pi) for a disc, 1/6 for a square.
    by_hand = abs(1 / math.log10(1 / (2 * math.pi)) - 1 / math.log10(1 / 6))
    assert far == pytest.approx(by_hand, rel=0.02)
    assert near < 0.002
    assert far > 15 * near


def test_rotation_and_scale_invariance_of_an_asymmetric_shape():
    shape = blobs()
    moved = transformed(shape, angle=-55, scale=0.8, shift=(5, -5))
    other = ellipse()
    for method in ("I1", "I2", "I3"):
        near = hu_distance(hu_moments(shape), hu_moments(moved), method)
        far = hu_distance(hu_moments(shape), hu_moments(other), method)
        assert near < 0.1 * far, method


def test_m_hum_is_the_mean_over_candidates_of_the_minimum_over_references():
    cands = [disc(radius=30), ellipse(), blobs()]
    refs = [disc(radius=50), ellipse(axes=(70, 20)), transformed(blobs(), 90, 1.0), ellipse(axes=(50, 48))]
    for method in ("I1", "I2", "I3"):
        by_opencv = [min(cv2.matchShapes(c.astype(np.uint8), r.astype(np.uint8), CV_METHODS[method], 0)
                         for r in refs) for c in cands]
        hc = np.array([hu_moments(c) for c in cands])
        hr = np.array([hu_moments(r) for r in refs])
        assert m_hum(hc, hr, method) == pytest.approx(np.mean(by_opencv), rel=1e-9)
        _, best = min_hu_distances(hc, hr, method)
        assert best[0] in (0, 3)  # a disc's closest reference is a disc-like shape


def test_empty_or_tiny_masks_hold_no_shape():
    mask = np.zeros((100, 100), bool)
    assert not has_shape(mask)
    mask[10:13, 10:13] = True  # 9 px
    assert not has_shape(mask)
    mask[10:15, 10:15] = True  # 25 px
    assert has_shape(mask)


# ------------------------------------------------------------------------------------------- fidelity


def test_psnr_and_ssim_against_hand_computations(rng):
    truth = gaussian_filter(rng.random((64, 64)), 2)
    # A constant offset of 0.1 on data range 1: MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert psnr(truth + 0.1, truth) == pytest.approx(20.0, abs=1e-9)
    assert psnr(truth, truth) == math.inf
    # SSIM by its formula: 7x7 uniform windows, sample covariances, K1 = 0.01, K2 = 0.03, border cropped.
    x = truth + 0.05 * rng.standard_normal(truth.shape)
    c1, c2, n = 0.01 ** 2, 0.03 ** 2, 49
    mx, my = uniform_filter(x, 7), uniform_filter(truth, 7)
    vx = (uniform_filter(x * x, 7) - mx * mx) * n / (n - 1)
    vy = (uniform_filter(truth * truth, 7) - my * my) * n / (n - 1)
    cxy = (uniform_filter(x * truth, 7) - mx * my) * n / (n - 1)
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(x, truth) == pytest.approx(smap[3:-3, 3:-3].mean(), abs=1e-9)
    assert ssim(truth, truth) == pytest.approx(1.0)


def test_affine_calibration_makes_a_scaled_and_offset_copy_perfect(rng):
    truth = gaussian_filter(rng.random((48, 48)), 1.5)
    copy = 3.0 * truth + 5.0
    assert affine_fit(copy, truth) == pytest.approx((1 / 3, -5 / 3))
    scores = paired_scores(copy, truth)
    assert scores["psnr"] < 0  # raw: five units off on a data range of one
    assert scores["psnr_cal"] > 100
    assert scores["ssim_cal"] == pytest.approx(1.0, abs=1e-9)


def test_calibrated_scores_ignore_any_affine_of_the_candidate_but_not_structure(rng):
    truth = gaussian_filter(rng.random((48, 48)), 1.5)
    truth = (truth - truth.min()) / (truth.max() - truth.min())
    noisy = truth + 0.05 * rng.standard_normal(truth.shape)
    a = paired_scores(noisy, truth)
    b = paired_scores(2.5 * noisy - 7.0, truth)
    assert b["psnr_cal"] == pytest.approx(a["psnr_cal"], abs=1e-9)
    assert b["ssim_cal"] == pytest.approx(a["ssim_cal"], abs=1e-9)
    assert b["psnr"] < a["psnr"] - 10
    worse = paired_scores(truth + 0.2 * rng.standard_normal(truth.shape), truth)
    assert worse["psnr_cal"] < a["psnr_cal"] - 5


# ---------------------------------------------------------------------------------------- consistency


def test_area_matrix_integer_factor_is_the_block_mean(rng):
    fine = rng.random((24, 16))
    by_blocks = fine.reshape(6, 4, 4, 4).mean(axis=(1, 3))
    assert np.allclose(degrade(fine, (4, 4), (6, 4)), by_blocks)


def test_area_matrix_fractional_factor_weights_by_overlap():
    m = area_matrix(2, 5, 2.5).toarray()  # coarse 0 covers [0, 2.5), coarse 1 covers [2.5, 5)
    assert np.allclose(m[0], [0.4, 0.4, 0.2, 0, 0])
    assert np.allclose(m[1], [0, 0, 0.2, 0.4, 0.4])
    assert np.allclose(area_matrix(3, 25, 8.33).sum(axis=1), 1.0)


def test_lr_consistency_is_high_for_bicubic_and_lower_for_invented_structure(rng):
    lr = gaussian_filter(rng.random((24, 24)), 1.0)
    lr = (lr - lr.min()) / (lr.max() - lr.min())
    up = resample_slice(lr, (8, 8))
    good = lr_consistency(up, lr, (8, 8))
    # The same output in other units (HU-like gain and offset) scores the same: units do not count.
    units = lr_consistency(1000 * up - 300, lr, (8, 8))
    assert units["lr_psnr"] == pytest.approx(good["lr_psnr"], abs=1e-6)
    invented = up.copy()
    yy, xx = np.mgrid[:192, :192]
    for cy, cx in rng.integers(20, 172, size=(8, 2)):
        invented[(yy - cy) ** 2 + (xx - cx) ** 2 < 12 ** 2] = 1.5  # bright structures the LR never saw
    bad = lr_consistency(invented, lr, (8, 8))
    assert good["lr_psnr"] > 35 and good["lr_ssim"] > 0.98
    assert bad["lr_psnr"] < good["lr_psnr"] - 10
    assert bad["lr_ssim"] < good["lr_ssim"] - 0.1


def test_psf_blurs_before_averaging(rng):
    fine = rng.random((64, 64))
    assert np.allclose(degrade(fine, (4, 4), (16, 16), psf_fwhm=0.0), degrade(fine, (4, 4), (16, 16)))
    blurred = degrade(fine, (4, 4), (16, 16), psf_fwhm=2.0)
    assert blurred.std() < degrade(fine, (4, 4), (16, 16)).std()


# -------------------------------------------------------------------------------------------- realism


def test_gradient_magnitude_of_a_ramp_is_its_slope():
    yy, xx = np.mgrid[:32, :32].astype(float)
    g = gradient_magnitude(0.03 * yy + 0.04 * xx)
    assert np.allclose(g, 0.05)


def test_wasserstein_distance_of_a_shift_is_the_shift(rng):
    a = rng.random(5000)
    assert distribution_distance(a + 0.3, a) == pytest.approx(0.3)
    assert math.isnan(distribution_distance(np.array([]), a))


def test_glcm_features_of_alternating_columns_by_hand(rng):
    u = np.zeros((32, 32))
    u[:, 1::2] = 1.0  # grey levels 0 and 31 alternate along rows; columns are constant
    feats = glcm_features(u, np.ones_like(u, bool), rng)
    contrast, homogeneity, energy, _ = feats[0]
    # Horizontal pairs always differ by 31 levels, vertical pairs never differ; the mean of both angles:
    assert contrast == pytest.approx((31 ** 2 + 0) / 2)
    assert homogeneity == pytest.approx((1 / (1 + 31 ** 2) + 1) / 2)
    assert energy == pytest.approx((math.sqrt(0.5) + math.sqrt(0.5)) / 2)  # two equally likely cells each


def test_glcm_distance_is_zero_for_the_same_texture_and_grows_with_noise(rng):
    smooth = gaussian_filter(rng.random((256, 256)), 2)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    region = np.ones_like(smooth, bool)
    ref = glcm_features(smooth, region, rng, max_patches=64)
    assert glcm_distance(ref, ref) == 0.0
    noisy = np.clip(smooth + 0.1 * rng.standard_normal(smooth.shape), 0, 1)
    assert glcm_distance(glcm_features(noisy, region, rng, max_patches=64), ref) > 1.0


def test_edge_sharpness_drops_with_blur():
    step = np.zeros((64, 64))
    step[:, 32:] = 1.0
    sharp = edge_sharpness(gradient_magnitude(step))
    assert sharp == pytest.approx(0.5)  # central differences spread a unit step over two pixels
    assert edge_sharpness(gradient_magnitude(gaussian_filter(step, 3))) < 0.2


# ------------------------------------------------------------------------------------------- periodic


def test_checkerboard_and_dot_lattice_raise_the_periodic_scores(rng):
    base = gaussian_filter(rng.random((128, 128)), 3)
    base = (base - base.min()) / (base.max() - base.min()) + 0.01 * rng.standard_normal((128, 128))
    yy, xx = np.mgrid[:128, :128]
    checker = ((yy + xx) % 2).astype(float)
    dots = ((yy % 4 == 0) & (xx % 4 == 0)).astype(float)
    clean = periodic_scores(base)
    with_checker = periodic_scores(base + 0.03 * checker)
    with_dots = periodic_scores(base + 0.05 * dots)
    assert clean["2px"] < 10 and clean["4px"] < 10
    assert with_checker["2px"] > 100 * clean["2px"]
    assert with_checker["4px"] == pytest.approx(clean["4px"], rel=0.05)  # a checkerboard has no period-4 part
    assert with_dots["4px"] > 100 * clean["4px"]


def test_white_noise_has_no_spectral_peaks(rng):
    scores = [periodic_scores(rng.standard_normal((128, 128))) for _ in range(8)]
    assert 0.8 < np.mean([s["4px"] for s in scores]) < 2.5  # about 1 / ln 2 for an exponential variate


# ---------------------------------------------------------------------------------------- uncertainty


def test_oracle_uncertainty_gives_ause_zero_and_random_a_clearly_positive_one(rng):
    err = np.abs(rng.standard_normal(20000)) * np.linspace(0.1, 2.0, 20000)
    oracle = sparsification(err.copy(), err)
    assert oracle.ause == 0.0
    assert np.array_equal(oracle.by_uncertainty, oracle.oracle)
    random = sparsification(rng.random(20000), err)
    assert random.ause > 0.2
    assert random.ause == pytest.approx(random.ause_random, rel=0.1)
    constant = sparsification(np.ones(20000), err)
    assert constant.ause == pytest.approx(random.ause_random, rel=0.1)  # ties are broken at random


def test_sparsification_curve_by_hand():
    err = np.array([4.0, 3.0, 2.0, 1.0])
    std = np.array([0.4, 0.1, 0.3, 0.2])  # removes 4 first, then 2, then 1
    sp = sparsification(std, err, fractions=np.array([0.0, 0.25, 0.5, 0.75]))
    assert np.allclose(sp.by_uncertainty, np.array([2.5, 2.0, 2.0, 3.0]) / 2.5)
    assert np.allclose(sp.oracle, np.array([2.5, 2.0, 1.5, 1.0]) / 2.5)
    by_hand = np.trapezoid(sp.by_uncertainty - sp.oracle, [0.0, 0.25, 0.5, 0.75])
    assert sp.ause == pytest.approx(by_hand)


def test_spearman_calibration_and_ratio(rng):
    std = rng.uniform(0.01, 0.2, 50000)
    err = std * rng.standard_normal(std.size)  # errors drawn with exactly the predicted std
    assert spearman(np.abs(err) ** 2, np.abs(err)) == pytest.approx(1.0)
    rms_std, rmse = calibration_curve(std, np.abs(err), bins=5)
    assert np.all(np.diff(rms_std) > 0)
    order = np.argsort(std)
    by_hand = [np.sqrt(np.mean(err[order][i * 10000:(i + 1) * 10000] ** 2)) for i in range(5)]
    assert np.allclose(rmse, by_hand)
    assert np.allclose(rms_std, [np.sqrt(np.mean(std[order][i * 10000:(i + 1) * 10000] ** 2)) for i in range(5)])
    assert np.allclose(rmse / rms_std, 1.0, atol=0.03)
    assert rmse_ratio(std, err) == pytest.approx(1.0, abs=0.02)
    assert rmse_ratio(std / 3, err) == pytest.approx(3.0, rel=0.03)  # over-confident by a factor of three
