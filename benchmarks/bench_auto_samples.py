"""`--samples auto` against a fixed T = 100: time and Monte Carlo error, side by side in one run.

Run ``python benchmarks/bench_auto_samples.py``. The bundled model predicts the demo's phantom scan
(a subject it never saw: ``--slices`` central slices of 384 x 384 HR, or with ``--spread`` that many
slices spaced evenly through the whole scan, as a whole-volume run meets them) through ``predict_volume`` with

- ``T = 100`` (the paper),
- ``samples="auto"`` with the default tolerances (:class:`~microsr_tf.inference.mc.AutoSamples`),
- ``samples="auto"`` at equal error: the tolerances set to the worst slice's convergence figures of the
  ``T = 100`` run, so that every slice stops once it has converged as far as ``T = 100`` takes the
  slowest slice,

taking turns ``--repeats`` times (best time kept). The error of each is measured against a
``T = --reference-samples`` posterior with the same seed (the same first samples, so each error is
that of stopping early): per slice, the mean absolute difference of the posterior mean and of the
variance over their average size, reported as the average and the worst slice.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

import machine  # noqa: E402  (benchmarks/machine.py, beside this script)
from microsr_tf.demo import BUNDLED_MODEL, DEMO_SEED, DEMO_SIZE  # noqa: E402
from microsr_tf.export import load_model  # noqa: E402
from microsr_tf.inference.mc import AutoSamples  # noqa: E402
from microsr_tf.inference.predict import predict_volume  # noqa: E402
from microsr_tf.phantoms import write_phantoms  # noqa: E402


def load() -> str:
    return "load " + "/".join(f"{v:.1f}" for v in os.getloadavg())


def slice_errors(result, reference) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: mean |mean - reference mean| / mean |reference mean|, and the same for the variance."""
    m, v = (nib.load(result.outputs[k]).get_fdata(dtype=np.float64) for k in ("mean", "var"))
    rm, rv = (nib.load(reference.outputs[k]).get_fdata(dtype=np.float64) for k in ("mean", "var"))
    axes = (0, 1)
    return (np.abs(m - rm).mean(axes) / np.abs(rm).mean(axes), np.abs(v - rv).mean(axes) / rv.mean(axes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--spread", action="store_true",
                        help="slices spaced evenly through the scan instead of central ones")
    args = parser.parse_args()
    gen, meta = load_model(BUNDLED_MODEL)
    with tempfile.TemporaryDirectory(prefix="bench_auto-") as work:
        write_phantoms(os.path.join(work, "phantom"), subjects=1, seed=DEMO_SEED, size=DEMO_SIZE, overwrite=True)
        scan = sorted(glob.glob(os.path.join(work, "phantom", "test", "lr", "*.nii.gz")))[0]
        depth = nib.load(scan).shape[2]
        if args.spread:  # a scan of the chosen slices only: each slice is predicted on its own either way
            image = nib.load(scan)
            picks = np.unique(np.linspace(0, depth - 1, args.slices).round().astype(int))
            scan = os.path.join(work, "spread.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, picks], image.affine, image.header), scan)
            roi = None
        else:
            k0 = max(0, (depth - args.slices) // 2)
            roi = ((None, None), (None, None), (k0, min(depth, k0 + args.slices)))

        def run(name: str, samples) -> tuple[object, float]:
            start = time.perf_counter()
            result = predict_volume(scan, gen, meta, os.path.join(work, name), samples=samples, seed=args.seed,
                                    roi=roi)
            return result, time.perf_counter() - start

        predict_volume(scan, gen, meta, os.path.join(work, "warm"), samples=4, seed=args.seed, roi=roi)  # trace once
        fixed, _ = run("fixed", 100)
        equal = AutoSamples(mean_tolerance=fixed.convergence["mean_rel_change"],
                            var_tolerance=fixed.convergence["var_rel_change"])
        variants = {"T = 100 (fixed)": 100, "auto, default tolerances": "auto",
                    "auto at T = 100's worst-slice error": equal}
        best: dict[str, tuple[object, float]] = {}
        before = load()
        for r in range(args.repeats):
            for i, (name, samples) in enumerate(variants.items()):
                result, seconds = run(f"v{i}_{r}", samples)
                if name not in best or seconds < best[name][1]:
                    best[name] = (result, seconds)
        after = load()
        reference, _ = run("reference", args.reference_samples)

        print(f"machine: {machine.describe()}")
        where = f"spread evenly through its {depth}" if args.spread else "central"
        print(f"bundled model, phantom scan ({fixed.n_slices} {where} slices, HR {fixed.shape[:2]}), "
              f"best of {args.repeats} taking turns ({before} before, {after} after); errors against "
              f"T = {args.reference_samples} with the same seed")
        auto = AutoSamples()
        print(f"default tolerances: mean {auto.mean_tolerance}, variance {auto.var_tolerance}; at T = 100's worst "
              f"slice: mean {equal.mean_tolerance:.4f}, variance {equal.var_tolerance:.4f}; checks at T = "
              f"{', '.join(map(str, auto.checkpoints))}")
        print(f"{'variant':<38}{'time s':>8}{'vs T=100':>10}{'passes':>8}{'T per slice':>22}"
              f"{'mean err avg/worst':>22}{'var err avg/worst':>21}")
        t100 = best["T = 100 (fixed)"][1]
        for name, (result, seconds) in best.items():
            counts = np.asarray(result.slice_samples)
            spread = f"{counts.min()}-{counts.max()} (median {np.median(counts):g})"
            em, ev = slice_errors(result, reference)
            print(f"{name:<38}{seconds:>8.1f}{t100 / seconds:>9.2f}x{counts.sum():>8}{spread:>22}"
                  f"{em.mean():>11.4f}/{em.max():<10.4f}{ev.mean():>10.3f}/{ev.max():<10.3f}")


if __name__ == "__main__":
    main()
