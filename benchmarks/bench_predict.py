"""P4: peak memory of whole-volume prediction must not grow with the number of slices.

Predicts volumes of the same in-plane size with 32 and 256 slices using the same tiny generator,
each in its own subprocess, and compares the children's peak resident set size (VmHWM). Target:
less than 10% growth from 32 to 256 slices. Also reports slices/s, and the resident anonymous and
file-backed memory at the end (file-backed pages include the output writers' memory maps).

    python benchmarks/bench_predict.py [--slices 32 256] [--size 64] [--samples 4] [--stitch whole]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FACTOR = 4
TARGET_GROWTH = 0.10


def vm_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (e.g. ``VmHWM``, the peak resident set)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)





def make_inputs(work: str, slice_counts: list[int], size: int, ngf: int, n_blocks: int) -> tuple[str, dict]:
    """A saved tiny generator (random weights) and one int16 LR volume per slice count."""
    import nibabel as nib
    import numpy as np

    from microsr_tf.models.artifact import save_generator
    from microsr_tf.models.generator import ResnetGenerator
    from microsr_tf.preprocessing import IntensityStats

    gen = ResnetGenerator(ngf=ngf, n_blocks=n_blocks)
    gen(np.zeros((1, 32, 32, 1), np.float32))
    model = os.path.join(work, "generator.keras")
    save_generator(gen, model, {
        "format": 1, "hr_spacing": [0.1, 0.1], "lr_spacing": [0.4, 0.4], "factors": [float(FACTOR)] * 2,
        "hr_stats": IntensityStats(2000.0, 500.0, -3.0, 3.0).to_dict(),
        "model": {"ngf": ngf, "n_blocks": n_blocks}, "patch_size": 32, "axis": -1})
    rng = np.random.default_rng(0)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    disc = (x ** 2 + y ** 2 < 0.5).astype(np.float32)
    volumes = {}
    for n in slice_counts:
        data = 100 + 20 * rng.standard_normal((size, size, n)) + 1200 * disc[..., None]
        path = os.path.join(work, f"lr_{n}.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([0.4, 0.4, 0.4, 1.0])), path)
        volumes[n] = path
    return model, volumes


def child(volume: str, model: str, out_dir: str, samples: int, stitch: str, tile: int) -> None:
    """Predict one volume and print peak memory and speed as JSON (run in a fresh process)."""
    from microsr_tf.inference.predict import predict_volume
    from microsr_tf.models.artifact import load_generator

    gen, meta = load_generator(model)
    before = vm_status("VmHWM")
    res = predict_volume(volume, gen, meta, out_dir, samples=samples, seed=0, stitch=stitch, tile=tile)
    print(json.dumps({"slices": res.n_slices, "shape": res.shape, "seconds": res.seconds,
                      "slices_per_s": res.slices_per_s, "hwm_before": before, "hwm": vm_status("VmHWM"),
                      "rss_anon": vm_status("RssAnon"), "rss_file": vm_status("RssFile")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs=2, default=[32, 256])
    parser.add_argument("--size", type=int, default=64, help="LR in-plane size (HR is 4x)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--stitch", default="whole")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--ngf", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("VOLUME", "MODEL", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, samples=args.samples, stitch=args.stitch, tile=args.tile)
        return

    with tempfile.TemporaryDirectory(prefix="bench_predict-") as work:
        model, volumes = make_inputs(work, args.slices, args.size, args.ngf, args.blocks)
        rows = []
        for n, path in volumes.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--child", path, model, os.path.join(work, f"out_{n}"),
                   "--samples", str(args.samples), "--stitch", args.stitch, "--tile", str(args.tile)]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"child for {n} slices failed:\n{done.stderr}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["wall"] = time.perf_counter() - t0
            rows.append(row)

    mib = 2.0 ** 20
    print(f"machine: {machine.describe()}")
    print(f"model: ResnetGenerator(ngf={args.ngf}, n_blocks={args.blocks}), T={args.samples}, "
          f"stitch={args.stitch}, LR {args.size}x{args.size} -> HR {args.size * FACTOR}x{args.size * FACTOR}")
    print(f"{'slices':>6} {'output shape':>16} {'peak RSS MiB':>13} {'after load MiB':>15} "
          f"{'end anon MiB':>13} {'end file MiB':>13} {'predict s':>10} {'slices/s':>9}")
    for r in rows:
        print(f"{r['slices']:>6} {str(tuple(r['shape'])):>16} {r['hwm'] / mib:>13.1f} {r['hwm_before'] / mib:>15.1f} "
              f"{r['rss_anon'] / mib:>13.1f} {r['rss_file'] / mib:>13.1f} {r['seconds']:>10.1f} "
              f"{r['slices_per_s']:>9.2f}")
    small, large = rows
    growth = (large["hwm"] - small["hwm"]) / small["hwm"]
    out_mib = 2 * 4 * large["shape"][0] * large["shape"][1] * large["shape"][2] / mib
    print(f"peak RSS growth {small['slices']} -> {large['slices']} slices: {growth:+.1%} "
          f"(target < {TARGET_GROWTH:.0%}; the {large['slices']}-slice mean+var outputs are {out_mib:.0f} MiB "
          f"as float32): {'PASS' if growth < TARGET_GROWTH else 'FAIL'}")


if __name__ == "__main__":
    main()
