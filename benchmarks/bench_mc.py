"""Monte Carlo engine benchmark: cached prefix vs naive full passes, sustained GFLOP/s, paper-size slice.

Run ``python benchmarks/bench_mc.py [--stretch]``. Everything uses the paper's generator
(ngf=64, nine residual blocks) with random weights (speed does not depend on them). Long runs are
timed on fewer passes and extrapolated linearly in T; the table says where.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from microsr_tf.inference.mc import MonteCarloPredictor, seed_rows  # noqa: E402
from microsr_tf.inference.stitching import tile_layout, tile_redundancy  # noqa: E402
from microsr_tf.models.generator import ResnetGenerator  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls, after one warm-up call (tracing, allocation)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def linear_in_t(predictor_for, x, t_small: int, t_large: int) -> tuple[float, float]:
    """Fit ``time = fixed + per_sample * T`` from two runs of the cached engine."""
    small = timed(lambda: predictor_for(t_small).predict(x))
    large = timed(lambda: predictor_for(t_large).predict(x))
    per_sample = max(large - small, 0.0) / (t_large - t_small)
    return small - per_sample * t_small, per_sample


def conv_reference_gflops() -> float:
    """What this machine's TensorFlow sustains on one large convolution (3x3, 256->256, 64x64, batch 8)."""
    x = tf.random.uniform([8, 64, 64, 256])
    k = tf.random.normal([3, 3, 256, 256])
    conv = tf.function(lambda a: tf.nn.conv2d(a, k, 1, "SAME"))
    seconds = timed(lambda: conv(x).numpy(), repeat=3)
    return 2 * 9 * 256 * 256 * 64 * 64 * 8 / seconds / 1e9


def generator(position: str, size: int) -> ResnetGenerator:
    gen = ResnetGenerator(ngf=64, n_blocks=9, upsample="transpose", dropout_rate=0.5, dropout_position=position)
    gen(tf.zeros([1, size, size, 1]), seed=tf.zeros([1, 2], tf.int32))
    return gen


def p1_p2(args) -> list[tuple[str, str]]:
    rows = []
    x = np.random.default_rng(0).random((1, args.size, args.size, 1)).astype(np.float32)
    pixels = args.size**2
    reference = conv_reference_gflops()
    rows.append(("reference conv 3x3 256->256 64x64 b8", f"{reference:.1f} GFLOP/s"))
    for position in ("bottleneck", "resblocks"):
        gen = generator(position, args.size)
        full = tf.function(lambda a, r: gen(a, seed=r))
        passes = args.naive_passes
        naive_pass = timed(lambda: [full(x, tf.constant(seed_rows([1], t))).numpy() for t in range(passes)]) / passes
        naive_total = naive_pass * args.samples
        for jit in ((False, True) if position == "bottleneck" and args.jit else (False,)):
            make = lambda t: MonteCarloPredictor(gen, samples=t, seed=1, jit_compile=jit)  # noqa: E731
            if position == "bottleneck":
                cached = timed(lambda: make(args.samples).predict(x))
                how = f"measured at T={args.samples}"
            else:
                fixed, per_sample = linear_in_t(make, x, 2, args.resblocks_samples)
                cached = fixed + per_sample * args.samples
                how = f"fit on T=2 and T={args.resblocks_samples}, extrapolated"
            label = f"{position}{' +jit' if jit else ''}"
            rows.append((f"P1 {label}: naive T={args.samples}",
                         f"{naive_total:.1f} s ({passes} passes of {naive_pass:.2f} s, extrapolated)"))
            rows.append((f"P1 {label}: cached T={args.samples}", f"{cached:.1f} s ({how})"))
            rows.append((f"P1 {label}: speed-up", f"{naive_total / cached:.1f}x (target >= 10x, bottleneck)"))
            macs = gen.flops_per_pixel()
            flops = 2 * pixels * (macs["prefix"] + args.samples * macs["suffix"])
            rows.append((f"P2 {label}: sustained", f"{flops / cached / 1e9:.1f} GFLOP/s = "
                                                   f"{100 * flops / cached / 1e9 / reference:.0f}% of reference "
                                                   f"(target >= 60%)"))
        if position == "bottleneck":
            pass_flops = 2 * pixels * sum(gen.flops_per_pixel().values())
            rows.append(("P2 naive full pass", f"{pass_flops / naive_pass / 1e9:.1f} GFLOP/s = "
                                               f"{100 * pass_flops / naive_pass / 1e9 / reference:.0f}% of reference"))
    return rows


def stretch(args) -> list[tuple[str, str]]:
    """A paper-size slice (1828 x 1828 at HR) in blend tiles at T=100, extrapolated from one tile batch."""
    shape = (1828, 1828)
    tile, overlap, batch = 256, 0.25, args.tile_batch
    _, _, _, origins = tile_layout(shape, "blend", tile, overlap)
    gen = generator("bottleneck", tile)
    tiles = np.random.default_rng(0).random((batch, tile, tile, 1)).astype(np.float32)
    make = lambda t: MonteCarloPredictor(gen, samples=t, seed=1)  # noqa: E731
    fixed, per_sample = linear_in_t(make, tiles, 2, args.stretch_samples)
    per_batch = fixed + per_sample * args.samples
    total = per_batch * len(origins) / batch
    return [
        ("stretch: 1828x1828 blend tiles", f"{len(origins)} tiles of {tile} (overlap {overlap}, "
                                           f"{tile_redundancy(shape, 'blend', tile, overlap):.2f}x pixels)"),
        ("stretch: one batch", f"{batch} tiles, T={args.samples}: {per_batch:.1f} s "
                               f"(fit on T=2 and T={args.stretch_samples}, extrapolated)"),
        ("stretch: whole slice T=100", f"{total:.0f} s = {total / 60:.1f} min, {total / 120:.1f}x the paper's 2 min "
                                       f"(extrapolated from one batch)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="input height and width (P1, P2)")
    parser.add_argument("--samples", type=int, default=100, help="T, Monte Carlo samples")
    parser.add_argument("--naive-passes", type=int, default=5, help="naive full passes timed, then extrapolated")
    parser.add_argument("--resblocks-samples", type=int, default=6, help="T timed for resblocks, then extrapolated")
    parser.add_argument("--jit", action="store_true", help="also time the cached engine with XLA jit_compile")
    parser.add_argument("--stretch", action="store_true", help="also time a 1828x1828 slice (extrapolated)")
    parser.add_argument("--stretch-samples", type=int, default=6, help="T timed per tile batch in --stretch")
    parser.add_argument("--tile-batch", type=int, default=8, help="tiles per predictor call in --stretch")
    args = parser.parse_args()
    rows = [("machine", f"{cpu_model()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")]
    rows += p1_p2(args)
    if args.stretch:
        rows += stretch(args)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
