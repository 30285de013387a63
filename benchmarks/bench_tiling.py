"""Tiling benchmark: the exact whole-slice posterior against independent tiles, in time and in answer.

Run ``python benchmarks/bench_tiling.py``. Two parts, side by side in one run:

1. The bundled model on an upsampled phantom LR slice: the exact posterior (whole slice) against what
   tiled inference used to compute -- overlapping tiles predicted independently, each normalised over
   its own content with its own dropout masks, blended with a Gaussian window. Reports the time of each
   and how far the tiled mean is from the exact one (share of pixels within twice the Monte Carlo
   standard error, 99th percentile of the difference over the intensity range).
2. The paper-width generator (ngf 64, nine blocks, random weights) with a norm-free decoder on a larger
   slice: the suffix in stripes of a few heights against one piece, same answer, time and peak memory
   estimate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import machine  # noqa: E402
from microsr_tf.demo import BUNDLED_MODEL  # noqa: E402
from microsr_tf.export import load_model  # noqa: E402
from microsr_tf.inference.mc import MonteCarloPredictor  # noqa: E402
from microsr_tf.inference.predict import input_stats, plan_volume  # noqa: E402
from microsr_tf.inference.stitching import predict_slice  # noqa: E402
from microsr_tf.models.generator import ResnetGenerator  # noqa: E402
from microsr_tf.patches import tile_grid  # noqa: E402
from microsr_tf.phantoms import write_phantoms  # noqa: E402
from microsr_tf.preprocessing import resample_slice  # noqa: E402


def gaussian_window(tile: int) -> np.ndarray:
    r = np.arange(tile) - (tile - 1) / 2.0
    g = np.exp(-0.5 * (r / (tile / 8.0)) ** 2)
    return np.outer(g, g)


def independent_tiles(gen, image: np.ndarray, tile: int, overlap: float, samples: int, seed: int) -> np.ndarray:
    """The former tiled inference: each tile its own image (own statistics, own masks), Gaussian blend."""
    stride = max(1, int(round(tile * (1 - overlap))))
    origins = tile_grid(image.shape, tile, stride)
    acc, weight = np.zeros(image.shape), np.zeros(image.shape)
    w = gaussian_window(tile)
    predictor = MonteCarloPredictor(gen, samples=samples)
    tiles = np.stack([image[i:i + tile, j:j + tile] for i, j in origins])[..., None]
    res = predictor.predict(tiles, seed=[seed + k for k in range(len(origins))])
    for k, (i, j) in enumerate(origins):
        acc[i:i + tile, j:j + tile] += w * res.mean[k, ..., 0]
        weight[i:i + tile, j:j + tile] += w
    return acc / weight


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bundled_rows(args) -> list[tuple[str, str]]:
    gen, meta = load_model(BUNDLED_MODEL)
    with tempfile.TemporaryDirectory() as work:
        write_phantoms(work, subjects=1, seed=2021, size="small", overwrite=True)
        lr = os.path.join(work, "test", "lr", sorted(os.listdir(os.path.join(work, "test", "lr")))[0])
        plan = plan_volume(lr, meta)
        stats = input_stats(plan.volume, plan.axis, plan.factors, meta)
        k = plan.slices[len(plan.slices) // 2]
        image = stats.normalize(resample_slice(plan.volume.read_slice(k, plan.axis), plan.factors))
    exact_predictor = MonteCarloPredictor(gen, samples=args.samples, seed=1)
    predict_slice(exact_predictor, image)  # trace
    exact, t_exact = timed(lambda: predict_slice(exact_predictor, image))
    bound = 2 * np.sqrt(exact.var) / np.sqrt(args.samples) + 1e-6
    span = float(exact.mean.max() - exact.mean.min())
    rows = [("bundled model, one phantom slice", f"{image.shape[0]}x{image.shape[1]}, T={args.samples}"),
            ("exact whole-slice posterior", f"{t_exact:.2f} s")]
    for tile in args.tiles:
        independent_tiles(gen, image, tile, 0.25, 2, 0)  # trace
        tiled, t_tiled = timed(lambda: independent_tiles(gen, image, tile, 0.25, args.samples, 7))
        diff = np.abs(tiled - exact.mean)
        rows.append((f"independent {tile} px tiles (overlap 0.25)",
                     f"{t_tiled:.2f} s ({t_tiled / t_exact:.2f}x the exact time); within 2 SE of the exact mean: "
                     f"{np.mean(diff <= bound):.1%} of pixels; 99th pct |diff| {np.percentile(diff, 99) / span:.1%} "
                     "of the intensity range"))
    return rows


def stripe_rows(args) -> list[tuple[str, str]]:
    tf.keras.utils.set_random_seed(0)
    gen = ResnetGenerator(ngf=64, n_blocks=9, dropout_position="bottleneck", decoder_norm="none")
    gen(tf.zeros([1, 16, 16, 1]))
    image = np.random.default_rng(0).random((args.size, args.size)).astype(np.float32)
    rows = [("paper-width generator, norm-free decoder", f"{args.size}x{args.size} slice, T={args.stripe_samples}")]
    reference = None
    for stripe in [None] + args.stripes:
        predictor = MonteCarloPredictor(gen, samples=args.stripe_samples, seed=3, stripe=stripe,
                                        memory_budget_mb=args.budget_mb)
        predict_slice(MonteCarloPredictor(gen, samples=2, seed=3, stripe=stripe, memory_budget_mb=args.budget_mb),
                      image)  # trace
        result, seconds = timed(lambda: predict_slice(predictor, image))
        if reference is None:
            reference, t_ref = result, seconds
            label = "one piece (budget " + f"{args.budget_mb:.0f} MB)"
        else:
            label = f"stripes of {stripe} px"
        diff = float(np.abs(result.mean - reference.mean).max())
        rows.append((label, f"{seconds:.2f} s ({seconds / t_ref:.2f}x one piece), max |dmean| vs one piece {diff:.1e}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--stripes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--stripe-samples", type=int, default=8)
    parser.add_argument("--budget-mb", type=float, default=8192)
    args = parser.parse_args()
    rows = [("machine", machine.describe())] + bundled_rows(args) + stripe_rows(args)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
