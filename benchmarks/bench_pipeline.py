"""Patches per second of the training stream: on-the-fly NIfTI (.nii.gz) reading vs prepared TFRecord shards.

Writes synthetic temporal-bone phantoms (``microsr_tf.phantoms.write_phantoms``: .nii.gz, LR about 8x
coarser in-plane) into a temporary directory, indexes them, prepares shards in each storage dtype, then
times the same ``TrainingData.dataset`` stream from each source side by side, in turns, and prints a
table with the speed-up over NIfTI and the machine it ran on. It also times the first batch of a
stream started at step 0 and at step 10^6 (what a resumed run pays to reach its position).

    python benchmarks/bench_pipeline.py [--subjects 3] [--size small] [--patch-size 64] [--batches 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from microsr_tf.config import DataConfig  # noqa: E402
from microsr_tf.phantoms import get_spec, write_phantoms  # noqa: E402
from microsr_tf.pipeline import SHARD_DTYPES, make_training_data, prepare_shards  # noqa: E402
import machine  # noqa: E402  (benchmarks/machine.py, beside this script)


def time_batches(it, batch_size: int, n_batches: int) -> float:
    """LR + HR patches per second over the next ``n_batches`` of a running stream."""
    start = time.perf_counter()
    for _ in range(n_batches):
        lr, hr = next(it)
    _ = float(lr[0, 0, 0, 0]) + float(hr[0, 0, 0, 0])
    return 2 * batch_size * n_batches / (time.perf_counter() - start)


def first_batch_s(data, batch_size: int, start_step: int) -> float:
    """Seconds from building the stream at ``start_step`` to its first batch."""
    start = time.perf_counter()
    lr, _ = next(iter(data.dataset(batch_size, start_step=start_step)))
    _ = float(lr[0, 0, 0, 0])
    return time.perf_counter() - start




def folder_mib(paths) -> float:
    """Total size of ``paths`` in MiB."""
    return sum(p.stat().st_size for p in paths) / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=3, help="LR and HR phantom volumes each")
    ap.add_argument("--size", default="small", help="phantom size (microsr_tf.phantoms.SIZES)")
    ap.add_argument("--patch-size", type=int, default=64)
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per source and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds over all sources (median reported)")
    args = ap.parse_args()

    cfg = DataConfig(patch_size=args.patch_size, stride=args.stride, shuffle_buffer=256, seed=0)
    sources = []  # (name, setup, MiB on disk, TrainingData)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_phantoms(root, args.subjects, seed=0, size=args.size)
        lr_dir, hr_dir = root / "lr", root / "hr"
        t0 = time.perf_counter()
        nifti = make_training_data(lr_dir, hr_dir, cfg)
        sources.append(("NIfTI .nii.gz", f"{time.perf_counter() - t0:.1f} (index)",
                        folder_mib([*lr_dir.iterdir(), *hr_dir.iterdir()]), nifti))
        for dtype in SHARD_DTYPES:
            out = root / f"shards-{dtype}"
            t0 = time.perf_counter()
            prepare_shards(lr_dir, hr_dir, out, cfg, dtype=dtype)
            setup = f"{time.perf_counter() - t0:.1f} (prepare)"
            shards = make_training_data(None, None, dataclasses.replace(cfg, shards_dir=str(out)))
            sources.append((f"shards {dtype}", setup, folder_mib(out.glob("*.tfrecord")), shards))
        # warm every stream up, then time them in turns so that load from other processes hits all alike
        iterators = [iter(data.dataset(args.batch_size)) for *_, data in sources]
        for it in iterators:
            time_batches(it, args.batch_size, 5)
        rates = [[] for _ in sources]
        for _ in range(args.repeats):
            for it, runs in zip(iterators, rates):
                runs.append(time_batches(it, args.batch_size, args.batches))
        starts = [[first_batch_s(data, args.batch_size, step) for step in (0, 10**6)] for *_, data in sources]
    medians = [float(np.median(runs)) for runs in rates]

    print(f"machine: {machine.describe()}")
    spec = get_spec(args.size)
    print(f"data: {args.subjects} LR {spec.lr_shape} + {args.subjects} HR {spec.hr_shape} '{spec.name}' phantoms; "
          f"{nifti.n_lr_patches} LR / {nifti.n_hr_patches} HR patches of "
          f"{args.patch_size} px at stride {args.stride}; batch {args.batch_size}, {args.batches} timed batches")
    print(f"| source | setup s | on disk MiB | patches/s (median of {args.repeats}) | vs NIfTI "
          "| first batch from step 0 / 10^6 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, setup, mib, _), rate, (at0, far) in zip(sources, medians, starts):
        print(f"| {name} | {setup} | {mib:.1f} | {rate:.0f} | {rate / medians[0]:.1f}x | {at0:.2f} / {far:.2f} |")


if __name__ == "__main__":
    main()
