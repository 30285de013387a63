"""Monte Carlo engine benchmark: cached prefix vs naive full passes, sustained GFLOP/s, paper-size slice.

Run ``python benchmarks/bench_mc.py [--stretch] [--jit]``. Everything uses the paper's generator
(ngf=64, nine residual blocks) with random weights (speed does not depend on them), once with the
fused kernels traced as plain ops ("plain", ``xla_kernels=False``) and once compiled by XLA
("fused"), side by side in one run. Long runs are timed on fewer passes and extrapolated linearly in
T; the table says where. Times exclude tracing (every predictor is warmed up first). The bfloat16
rows compare ``precision="float32"`` and ``"bfloat16"`` on the same weights, alternating runs so that
other load on the machine hits both alike (best of ``--repeats``), and note the load average.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from microsr_tf.inference.mc import MonteCarloPredictor, seed_rows  # noqa: E402
from microsr_tf.models.generator import PRECISIONS, ResnetGenerator  # noqa: E402
import machine  # noqa: E402  (benchmarks/machine.py, beside this script)





def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls, after one warm-up call (tracing, allocation)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def predict_time(predictor: MonteCarloPredictor, x: np.ndarray, samples: int) -> float:
    """Wall time of one ``predict`` at ``samples`` passes (warm it up at the same ``samples`` first)."""
    predictor.samples = samples
    start = time.perf_counter()
    predictor.predict(x)
    return time.perf_counter() - start


def linear_in_t(predictor: MonteCarloPredictor, x: np.ndarray, t_small: int, t_large: int) -> tuple[float, float]:
    """Fit ``time = fixed + per_sample * T`` from two runs of the cached engine, each warmed up at its
    own T (chunk sizes differ with T, and every new chunk shape compiles the XLA kernels once)."""
    predict_time(predictor, x, t_small)
    predict_time(predictor, x, t_large)
    small = predict_time(predictor, x, t_small)
    large = predict_time(predictor, x, t_large)
    per_sample = max(large - small, 0.0) / (t_large - t_small)
    return small - per_sample * t_small, per_sample


def conv_reference_gflops(dtype: tf.DType = tf.float32) -> float:
    """What this machine's TensorFlow sustains on one large convolution (3x3, 256->256, 64x64, batch 8)."""
    x = tf.cast(tf.random.uniform([8, 64, 64, 256]), dtype)
    k = tf.cast(tf.random.normal([3, 3, 256, 256]), dtype)
    conv = tf.function(lambda a: tf.nn.conv2d(a, k, 1, "SAME"))
    seconds = timed(lambda: conv(x).numpy(), repeat=3)
    return 2 * 9 * 256 * 256 * 64 * 64 * 8 / seconds / 1e9


def generator_pair(position: str, size: int) -> dict[str, ResnetGenerator]:
    """The paper's generator with uncompiled kernels ("plain") and, with the same weights, XLA-compiled
    kernels ("fused")."""
    pair = {}
    for name in ("plain", "fused"):
        gen = ResnetGenerator(ngf=64, n_blocks=9, upsample="transpose", dropout_rate=0.5, dropout_position=position)
        gen.xla_kernels = name == "fused"
        gen(tf.zeros([1, size, size, 1]), seed=tf.zeros([1, 2], tf.int32))
        pair[name] = gen
    pair["fused"].set_weights(pair["plain"].get_weights())
    return pair


def p1_p2(args) -> list[tuple[str, str]]:
    rows = []
    x = np.random.default_rng(0).random((1, args.size, args.size, 1)).astype(np.float32)
    pixels = args.size**2
    reference = conv_reference_gflops()
    rows.append(("reference conv 3x3 256->256 64x64 b8", f"{reference:.1f} GFLOP/s"))
    for position in ("bottleneck", "resblocks"):
        pair = generator_pair(position, args.size)
        naive, cached, means = {}, {}, {}
        for name, gen in pair.items():
            full = tf.function(lambda a, r, gen=gen: gen(a, seed=r))
            passes = args.naive_passes
            naive[name] = timed(lambda: [full(x, tf.constant(seed_rows([1], t))).numpy()
                                         for t in range(passes)]) / passes
            predictor = MonteCarloPredictor(gen, samples=2, seed=1)
            if position == "bottleneck":
                predict_time(predictor, x, args.samples)  # warm-up at the same chunk shapes
                cached[name] = predict_time(predictor, x, args.samples)
                means[name] = predictor.predict(x).mean
                how = f"measured at T={args.samples}"
            else:
                fixed, per_sample = linear_in_t(predictor, x, 2, args.resblocks_samples)
                cached[name] = fixed + per_sample * args.samples
                how = f"fit on T=2 and T={args.resblocks_samples}, extrapolated"
        macs = pair["fused"].flops_per_pixel()
        flops = 2 * pixels * (macs["prefix"] + args.samples * macs["suffix"])
        pass_flops = 2 * pixels * sum(macs.values())
        target = " (target >= 10x)" if position == "bottleneck" else ""
        for name in pair:
            rows.append((f"P1 {position} {name}: naive T={args.samples}",
                         f"{naive[name] * args.samples:.1f} s ({args.naive_passes} passes of {naive[name]:.2f} s, "
                         f"extrapolated)"))
            rows.append((f"P1 {position} {name}: cached T={args.samples}", f"{cached[name]:.1f} s ({how})"))
            rows.append((f"P1 {position} {name}: speed-up", f"{naive[name] * args.samples / cached[name]:.1f}x "
                                                            f"vs naive with the same ops{target}"))
            rows.append((f"P2 {position} {name}: sustained",
                         f"{flops / cached[name] / 1e9:.1f} GFLOP/s = {100 * flops / cached[name] / 1e9 / reference:.0f}%"
                         f" of reference{' (target >= 60%)' if position == 'bottleneck' else ''}; naive pass "
                         f"{100 * pass_flops / naive[name] / 1e9 / reference:.0f}%"))
        rows.append((f"P1 {position}: fused vs plain", f"cached {cached['plain'] / cached['fused']:.2f}x faster, "
                                                       f"naive {naive['plain'] / naive['fused']:.2f}x; fused cached "
                                                       f"{naive['plain'] * args.samples / cached['fused']:.1f}x faster "
                                                       f"than plain naive"))
        if means:
            rows.append((f"P1 {position}: max |mean fused - plain|",
                         f"{np.abs(means['fused'] - means['plain']).max():.1e}"))
        if position == "bottleneck" and args.jit:
            predictor = MonteCarloPredictor(pair["fused"], samples=2, seed=1, jit_compile=True)
            predict_time(predictor, x, args.samples)
            jit = predict_time(predictor, x, args.samples)
            rows.append((f"P1 bottleneck fused +jit: cached T={args.samples}",
                         f"{jit:.1f} s ({cached['fused'] / jit:.2f}x the non-jit time's speed)"))
    return rows


def load() -> str:
    return "load avg " + "/".join(f"{v:.1f}" for v in os.getloadavg())


def precision_rows(args) -> list[tuple[str, str]]:
    """Cached T at ``--size`` (bottleneck, fused ops) and the reference conv in float32 vs bfloat16,
    interleaved, best of ``--repeats``."""
    x = np.random.default_rng(0).random((1, args.size, args.size, 1)).astype(np.float32)
    gen = generator_pair("bottleneck", args.size)["fused"]
    predictors = {p: MonteCarloPredictor(gen, samples=args.samples, seed=1, precision=p) for p in PRECISIONS}
    results = {p: predictor.predict(x) for p, predictor in predictors.items()}  # warm-up, and accuracy
    cached = {p: float("inf") for p in PRECISIONS}
    conv = {p: 0.0 for p in PRECISIONS}
    before = load()
    for _ in range(args.repeats):
        for p in PRECISIONS:
            cached[p] = min(cached[p], predict_time(predictors[p], x, args.samples))
            conv[p] = max(conv[p], conv_reference_gflops(tf.as_dtype(p)))
    rows = [("precision: load", f"{before} before, {load()} after")]
    for p in PRECISIONS:
        rows.append((f"precision: reference conv {p}", f"{conv[p]:.1f} GFLOP/s"))
        rows.append((f"precision: cached T={args.samples} {args.size}^2 {p}", f"{cached[p]:.2f} s"))
    exact, fast = results["float32"], results["bfloat16"]
    rows.append(("precision: bfloat16 speed-up", f"{cached['float32'] / cached['bfloat16']:.2f}x end to end, "
                                                 f"{conv['bfloat16'] / conv['float32']:.1f}x on the reference conv"))
    rows.append(("precision: bfloat16 vs float32 posterior",
                 f"max |dmean| {np.abs(fast.mean - exact.mean).max():.1e}, mean |dmean| "
                 f"{np.abs(fast.mean - exact.mean).mean():.1e}, max |dvar| {np.abs(fast.var - exact.var).max():.1e} "
                 f"(max var {exact.var.max():.1e}), mean |dvar| / mean var "
                 f"{np.abs(fast.var - exact.var).mean() / exact.var.mean():.1e}"))
    return rows


def stretch_whole(args, precision: str) -> tuple[float, float, float]:
    """The whole 1828x1828 slice (padded to a multiple of 4) at T=``--samples``: ``(total, prefix,
    per sample)`` fit on T=2 and T=4 and extrapolated linearly."""
    side = -(-1828 // 4) * 4
    gen = generator_pair("bottleneck", 256)["fused"]
    image = np.random.default_rng(0).random((1, side, side, 1)).astype(np.float32)
    predictor = MonteCarloPredictor(gen, samples=2, seed=1, memory_budget_mb=args.whole_budget_mb,
                                    precision=precision)
    fixed, per_sample = linear_in_t(predictor, image, 2, 4)
    return fixed + per_sample * args.samples, fixed, per_sample


def stretch(args) -> list[tuple[str, str]]:
    """A paper-size slice (1828 x 1828 at HR) at T=``--samples``, exact whole-slice posterior: the
    CycleGAN decoder (instance norm: one piece) against the norm-free decoder (stripes), each extrapolated
    from T=2 and T=4."""
    side = -(-1828 // 4) * 4
    image = np.random.default_rng(0).random((1, side, side, 1)).astype(np.float32)
    rows = []
    for decoder_norm in ("instance", "none"):
        gen = ResnetGenerator(ngf=64, n_blocks=9, upsample="transpose", dropout_rate=0.5,
                              dropout_position="bottleneck", decoder_norm=decoder_norm)
        gen(tf.zeros([1, 16, 16, 1]), seed=tf.zeros([1, 2], tf.int32))
        predictor = MonteCarloPredictor(gen, samples=2, seed=1, memory_budget_mb=args.whole_budget_mb)
        fixed, per_sample = linear_in_t(predictor, image, 2, 4)
        total = fixed + per_sample * args.samples
        rows.append((f"stretch: 1828^2 T={args.samples} decoder_norm={decoder_norm}",
                     f"{total:.0f} s = {total / 60:.1f} min (prefix {fixed:.0f} s + {per_sample:.2f} s per sample, "
                     f"fit on T=2 and T=4, extrapolated); {load()}"))
    return rows


def stretch_bfloat16(args) -> list[tuple[str, str]]:
    total, fixed, per_sample = stretch_whole(args, "bfloat16")
    return [(f"stretch: whole slice T={args.samples} bfloat16",
             f"{total:.0f} s = {total / 60:.1f} min, goal <= 2 min (prefix {fixed:.0f} s + {per_sample:.2f} s per "
             f"sample, fit on T=2 and T=4, extrapolated); {load()}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="input height and width (P1, P2)")
    parser.add_argument("--samples", type=int, default=100, help="T, Monte Carlo samples")
    parser.add_argument("--naive-passes", type=int, default=5, help="naive full passes timed, then extrapolated")
    parser.add_argument("--resblocks-samples", type=int, default=6, help="T timed for resblocks, then extrapolated")
    parser.add_argument("--jit", action="store_true", help="also time the cached engine with XLA jit_compile")
    parser.add_argument("--stretch", action="store_true", help="also time a 1828x1828 slice (extrapolated)")
    parser.add_argument("--whole-budget-mb", type=float, default=8192,
                        help="memory budget of the whole-slice run in --stretch")
    parser.add_argument("--precision-only", action="store_true",
                        help="only the float32 vs bfloat16 rows (and --stretch), not P1/P2")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per precision (best kept)")
    args = parser.parse_args()
    rows = [("machine", machine.describe())]
    if not args.precision_only:
        rows += p1_p2(args)
    rows += precision_rows(args)
    if args.stretch and not args.precision_only:
        rows += stretch(args)
    if args.stretch:
        rows += stretch_bfloat16(args)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
