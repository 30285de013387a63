"""P0 through the command line: `microsr-tf predict` on a paper-size slice and on a cochlear volume.

Run ``python benchmarks/bench_p0.py``. It saves the paper's generator (ngf 64, nine residual blocks,
bottleneck dropout, transposed-convolution upsampling; random weights, speed does not depend on them)
once with the CycleGAN decoder (``decoder_norm="instance"``) and once with the norm-free decoder
(``"none"``, run in stripes), writes a 229 x 229 LR slice at 0.144 mm (1832 x 1832 HR at 0.018 mm, 8x)
and times ``microsr-tf predict SLICE --model M -T 100`` end to end in a fresh process (start-up, model
load, reading, prediction, writing), for each decoder in float32 and ``--precision bfloat16``, runs of
the configurations taking turns so that other load on the machine hits them alike (best of
``--repeats``). Every row gives the wall time and the process's CPU time over the cores, which is what
the run would take with the cores to itself (the machine this was written on is shared).

The bound: the multiply-adds of the run (``flops_per_pixel()``: prefix once, suffix T times per
output pixel) at the rate the reference convolution (3x3, 256 -> 256, 64 x 64, batch 8) sustains in the
same run, float32 for the prefix and for a float32 suffix, bfloat16 for a bfloat16 suffix: no run of
this network can beat it on this machine without beating the reference convolution.

Volume: a cochlear region at the paper's spacings (10.8 mm field of view: 75 x 75 LR, 600 x 600 HR per
slice, 600 slices) is timed on ``--volume-slices`` slices and on one slice, and extrapolated linearly
to 600 slices (fixed cost + per-slice cost); the table says so.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

HR_SPACING = 0.018  # mm, the paper's micro-CT
FACTOR = 8
LR_SIDE = 229  # 229 * 8 = 1832 HR pixels, the paper's 1828 rounded to the factor
VOLUME_LR_SIDE = 75  # 10.8 mm at 0.144 mm: 600 HR pixels
VOLUME_SLICES = 600
TARGET_SLICE_S = 60.0
TARGET_VOLUME_S = 3600.0


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reference_gflops(dtype: str, repeats: int = 3) -> tuple[float, float]:
    """(wall, CPU-time-per-core) GFLOP/s of the reference 3x3 256->256 convolution, best of ``repeats``."""
    import tensorflow as tf

    dt = tf.as_dtype(dtype)
    x = tf.cast(tf.random.uniform([8, 64, 64, 256]), dt)
    k = tf.cast(tf.random.normal([3, 3, 256, 256]), dt)
    conv = tf.function(lambda a: tf.nn.conv2d(a, k, 1, "SAME"))
    conv(x).numpy()
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        conv(x).numpy()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    flops = 2 * 9 * 256 * 256 * 64 * 64 * 8
    return flops / wall / 1e9, flops / (cpu / os.cpu_count()) / 1e9


def save_model(path: str, decoder_norm: str) -> dict[str, int]:
    """The paper-size generator with seeded random weights, saved as the CLI loads it; its MACs per pixel."""
    import tensorflow as tf

    from microsr_tf.models.artifact import save_generator
    from microsr_tf.models.generator import ResnetGenerator
    from microsr_tf.preprocessing import IntensityStats

    tf.keras.utils.set_random_seed(0)
    gen = ResnetGenerator(ngf=64, n_blocks=9, upsample="transpose", dropout_rate=0.5,
                          dropout_position="bottleneck", decoder_norm=decoder_norm)
    gen(np.zeros((1, 16, 16, 1), np.float32))
    save_generator(gen, path, {
        "format": 1, "hr_spacing": [HR_SPACING] * 2, "lr_spacing": [HR_SPACING * FACTOR] * 2,
        "factors": [float(FACTOR)] * 2, "hr_stats": IntensityStats(2000.0, 500.0, -3.0, 3.0).to_dict(),
        "model": {"ngf": 64, "n_blocks": 9, "decoder_norm": decoder_norm}, "patch_size": 256, "axis": -1})
    return gen.flops_per_pixel()


def write_lr(path: str, side: int, slices: int) -> None:
    """An int16 LR scan at the model's LR spacing: a bright ring ("bone") around a dark lumen, on noise."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    y, x = np.mgrid[-1:1:side * 1j, -1:1:side * 1j]
    r = np.hypot(x, y)
    bone = ((r > 0.3) & (r < 0.6)).astype(np.float32)
    data = 100 + 30 * rng.standard_normal((side, side, slices)) + 1400 * bone[..., None]
    lr = HR_SPACING * FACTOR
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([lr, lr, lr, 1.0])), path)


def cli_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "microsr-tf")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "microsr_tf.cli.main"]


def run_predict(model: str, scan: str, out_dir: str, samples: int, precision: str) -> dict[str, float]:
    """One `microsr-tf predict` in a fresh process: wall, CPU seconds, and predict's own seconds."""
    cmd = cli_command() + ["predict", scan, "--model", model, "--out-dir", out_dir, "-T", str(samples),
                           "--seed", "0", "--precision", precision]
    c0, t0 = cpu_children(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, cpu_children() - c0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    found = re.search(r"slices -> .* in ([0-9.]+) s", done.stdout)
    return {"wall": wall, "cpu": cpu, "predict": float(found.group(1)) if found else float("nan")}


def load() -> str:
    return "load " + "/".join(f"{v:.1f}" for v in os.getloadavg())


def best_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return min(runs, key=lambda r: r["wall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="T")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, taking turns (best kept)")
    parser.add_argument("--decoders", nargs="+", default=["instance", "none"], choices=["instance", "none"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--volume-slices", type=int, default=4,
                        help="slices of the 600^2 volume timed (0: skip the volume, else at least 2), extrapolated to 600")
    parser.add_argument("--volume-decoders", nargs="+", default=["none"], choices=["instance", "none"])
    parser.add_argument("--volume-precisions", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.volume_slices == 1:
        parser.error("--volume-slices: 0 (skip the volume) or at least 2 (a fixed and a per-slice cost)")
    cores = os.cpu_count()
    print(f"machine: {machine.describe()}")
    ref = {p: reference_gflops(p) for p in ("float32", "bfloat16")}
    for p, (wall, cpu) in ref.items():
        print(f"reference conv {p}: {wall:.0f} GFLOP/s wall, {cpu:.0f} GFLOP/s over {cores} cores' CPU time")
    side = LR_SIDE * FACTOR
    with tempfile.TemporaryDirectory(prefix="bench_p0-") as work:
        models, macs = {}, {}
        for dn in sorted(set(args.decoders) | set(args.volume_decoders if args.volume_slices else [])):
            models[dn] = os.path.join(work, f"paper_{dn}.keras")
            macs[dn] = save_model(models[dn], dn)
        scan = os.path.join(work, "slice.nii.gz")
        write_lr(scan, LR_SIDE, 1)
        configs = [(dn, p) for dn in args.decoders for p in args.precisions]
        runs = {c: [] for c in configs}
        before = load()
        for r in range(args.repeats):
            for dn, p in configs:
                runs[(dn, p)].append(run_predict(models[dn], scan, os.path.join(work, f"out_{dn}_{p}_{r}"),
                                                 args.samples, p))
                print(f"  ran decoder_norm={dn} {p}: {runs[(dn, p)][-1]['wall']:.1f} s wall ({load()})", flush=True)
        print(f"\none {side} x {side} HR slice (229 x 229 LR, 8x), T = {args.samples}, end to end through "
              f"`microsr-tf predict` ({before} before, {load()} after):")
        header = (f"{'decoder_norm':<13}{'precision':<10}{'wall s':>8}{'CPU s / ' + str(cores):>11}{'predict s':>10}"
                  f"{'bound s':>9}{'CPU/bound':>10}  target <= {TARGET_SLICE_S:.0f} s")
        print(header)
        best = {c: best_of(runs[c]) for c in configs}
        for dn, p in configs:
            b = best[(dn, p)]
            suffix_rate = ref[p][1] if p == "bfloat16" else ref["float32"][1]
            bound = 2 * side * side * (macs[dn]["prefix"] / ref["float32"][1]
                                       + args.samples * macs[dn]["suffix"] / suffix_rate) / 1e9
            b["bound"] = bound
            verdict = ("met (wall)" if b["wall"] <= TARGET_SLICE_S else
                       "met with the cores to itself" if b["cpu"] / cores <= TARGET_SLICE_S else "not met")
            print(f"{dn:<13}{p:<10}{b['wall']:>8.1f}{b['cpu'] / cores:>11.1f}{b['predict']:>10.1f}{bound:>9.1f}"
                  f"{b['cpu'] / cores / bound:>9.2f}x  {verdict}")
        for dn in args.decoders:
            if ("float32" in args.precisions) and ("bfloat16" in args.precisions):
                f, h = best[(dn, "float32")], best[(dn, "bfloat16")]
                print(f"bfloat16 vs float32, decoder_norm={dn}: {f['wall'] / h['wall']:.2f}x wall, "
                      f"{f['cpu'] / h['cpu']:.2f}x CPU")
        for p in args.precisions:
            if {"instance", "none"} <= set(args.decoders):
                i, n = best[("instance", p)], best[("none", p)]
                print(f"norm-free (stripes) vs instance-norm decoder (whole slice), {p}: {i['wall'] / n['wall']:.2f}x "
                      f"wall, {i['cpu'] / n['cpu']:.2f}x CPU")
        print(f"MACs per HR pixel: prefix {macs[args.decoders[0]]['prefix']:,}, suffix "
              f"{macs[args.decoders[0]]['suffix']:,} (x T)")

        if args.volume_slices:
            vside = VOLUME_LR_SIDE * FACTOR
            print(f"\ncochlear volume: {vside} x {vside} HR x {VOLUME_SLICES} slices, T = {args.samples}; timed on 1 "
                  f"and {args.volume_slices} slices, extrapolated linearly to {VOLUME_SLICES} (target < 1 h):")
            one, many = os.path.join(work, "vol1.nii.gz"), os.path.join(work, "volk.nii.gz")
            write_lr(one, VOLUME_LR_SIDE, 1)
            write_lr(many, VOLUME_LR_SIDE, args.volume_slices)
            for dn in args.volume_decoders:
                for p in args.volume_precisions:
                    a = run_predict(models[dn], one, os.path.join(work, f"v1_{dn}_{p}"), args.samples, p)
                    k = run_predict(models[dn], many, os.path.join(work, f"vk_{dn}_{p}"), args.samples, p)
                    per = {key: (k[key] - a[key]) / (args.volume_slices - 1) for key in ("wall", "cpu")}
                    total = {key: a[key] + per[key] * (VOLUME_SLICES - 1) for key in ("wall", "cpu")}
                    print(f"decoder_norm={dn} {p}: {per['wall']:.1f} s per slice wall ({per['cpu'] / cores:.1f} s "
                          f"CPU / {cores}); {VOLUME_SLICES} slices ~ {total['wall'] / 3600:.2f} h wall, "
                          f"{total['cpu'] / cores / 3600:.2f} h CPU / {cores} (extrapolated; {load()})", flush=True)


if __name__ == "__main__":
    main()
