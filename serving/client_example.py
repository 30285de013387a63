"""A NIfTI scan in, NIfTI posterior mean, variance and standard deviation out, through a model server's
REST API -- with numpy, nibabel and the standard library only (no TensorFlow, no microsr-tf).

    python serving/client_example.py scan.nii.gz out/ --server http://127.0.0.1:8501 --samples 100 --seed 0

The server's mc_scanner signature resamples each LR slice to the HR grid, normalises it with the
model's stored statistics, runs the Monte Carlo posterior and maps it back to HR units; this script
cuts the scan into slices along its last axis, gives slice k the seed `microsr-tf predict` gives it,
and writes the results with the HR grid's affine. The files equal those of
`microsr-tf predict scan.nii.gz --normalize model --stitch whole --std` with the same seed.
Assumes the header's spatial unit is mm. HTTPS: --server https://... --ca ca.pem; a bearer token is
read from the environment variable MICROSR_SERVING_TOKEN.
"""

import argparse
import json
import os
import ssl
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np


def call(server, model, signature, inputs, context=None):
    """POST /v1/models/MODEL:predict with a signature and columnar inputs; the outputs."""
    request = urllib.request.Request(
        f"{server}/v1/models/{model}:predict", headers={"Content-Type": "application/json"},
        data=json.dumps({"signature_name": signature, "inputs": inputs}).encode("utf-8"))
    if os.environ.get("MICROSR_SERVING_TOKEN"):
        request.add_header("Authorization", "Bearer " + os.environ["MICROSR_SERVING_TOKEN"])
    with urllib.request.urlopen(request, timeout=600, context=context) as response:
        return json.loads(response.read())["outputs"]


def slice_seed(seed, k):
    """The dropout seed of slice k, as `microsr-tf predict --seed SEED` derives it."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint32)[0] >> 1)


def main():
    parser = argparse.ArgumentParser(description="NIfTI in, posterior NIfTI out, through TF-Serving's REST API")
    parser.add_argument("scan")
    parser.add_argument("out_dir")
    parser.add_argument("--server", default="http://127.0.0.1:8501")
    parser.add_argument("--model", default="microsr")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ca", help="CA bundle of the server's certificate (https)")
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.ca) if args.ca else None

    meta = json.loads(call(args.server, args.model, "metadata", {"probe": [0]}, context)[0])
    scan = nib.load(args.scan)
    lr = scan.get_fdata(dtype=np.float32)  # scl_slope / scl_inter applied
    if lr.ndim == 4 and lr.shape[3] == 1:  # a 3-D volume stored with a singleton 4th axis
        lr = lr[..., 0]
    if lr.ndim != 3:
        raise SystemExit(f"{args.scan}: expected a 3-D volume, got shape {lr.shape}")
    spacing = [float(z) for z in scan.header.get_zooms()[:2]]
    results = {"mean": [], "variance": [], "std": []}
    for k in range(lr.shape[2]):
        outputs = call(args.server, args.model, "mc_scanner", {
            "lr_image": lr[None, :, :, k, None].tolist(), "spacing": [spacing],
            "samples": [args.samples], "seed": [slice_seed(args.seed, k)]}, context)
        for key, values in results.items():
            values.append(np.asarray(outputs[key], np.float32)[0, :, :, 0])

    # The HR grid: voxel j along an in-plane axis refined by f sits at LR index (j + 0.5) / f - 0.5.
    to_lr = np.eye(4)
    for axis, (s, h) in enumerate(zip(spacing, meta["hr_spacing"])):
        f = max(s / h, 1.0)
        to_lr[axis, axis], to_lr[axis, 3] = 1.0 / f, 0.5 / f - 0.5
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.scan).name.removesuffix(".gz").removesuffix(".nii")
    # The scan's qform/sform codes (scanner, aligned, ...) carry over, each form moved to the HR grid.
    qcode, scode = int(scan.header["qform_code"]), int(scan.header["sform_code"])
    for key, name in (("mean", "mean"), ("variance", "var"), ("std", "std")):
        image = nib.Nifti1Image(np.stack(results[key], axis=-1), scan.affine @ to_lr)
        image.set_qform(scan.header.get_qform() @ to_lr, code=qcode)
        image.set_sform(scan.affine @ to_lr, code=scode if scode or qcode else 2)
        image.header.set_xyzt_units(*scan.header.get_xyzt_units())
        nib.save(image, out / f"{stem}_{name}.nii.gz")
        print(f"wrote {out / f'{stem}_{name}.nii.gz'} {image.shape}")


if __name__ == "__main__":
    main()
