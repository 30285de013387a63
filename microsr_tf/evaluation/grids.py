"""Where a prediction lies: on the LR scan's upsampled grid and inside an aligned HR volume.

``predict`` writes its outputs on the grid of :func:`microsr_tf.volumes.resampled_affine` applied to the
LR volume (or to a box of it, with ``--roi``). From the two affines alone this module recovers which LR
box was upsampled and by which factors, and where the prediction sits in a paired HR volume, refusing
anything that is rotated, scaled or shifted by a fraction of a voxel against them.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..volumes import in_plane_axes, resampled_shape
from .sources import Box

INDEX_TOLERANCE = 1e-3  # voxels: float32 affines in NIfTI headers round well below this


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _integer(value: float) -> int | None:
    r = round(float(value))
    return int(r) if abs(value - r) <= INDEX_TOLERANCE else None


def lr_box(pred_path: str | os.PathLike, pred_shape: Sequence[int], pred_affine: np.ndarray,
           lr_path: str | os.PathLike, lr_shape: Sequence[int], lr_affine: np.ndarray,
           axis: int = -1) -> tuple[Box, tuple[float, float]]:
    """The LR voxel box and in-plane factors whose bicubic upsampling is exactly the prediction's grid.

    InputError naming the prediction when its grid is not the LR's (or an LR box's) upsampled grid:
    axes not aligned, a different slice spacing, an in-plane spacing not finer than the LR's, an origin
    between LR voxel edges, or a box reaching outside the LR volume.
    """
    ax = int(axis) % 3
    a, b = in_plane_axes(ax)
    m = np.linalg.inv(np.asarray(lr_affine, np.float64)) @ np.asarray(pred_affine, np.float64)
    linear = m[:3, :3]
    scale = np.diag(linear)
    pred_sp, lr_sp = _spacing(pred_affine), _spacing(lr_affine)
    where = f"the upsampled grid of the LR scan {os.fspath(lr_path)}"
    if np.abs(linear - np.diag(scale)).max() > INDEX_TOLERANCE or (scale <= 0).any():
        raise InputError(pred_path, f"is rotated or flipped against {where} (its affine is not the LR's "
                                    "with finer in-plane voxels)")
    if abs(scale[ax] - 1.0) > INDEX_TOLERANCE:
        raise InputError(pred_path, f"slice spacing {pred_sp[ax]:.4g} differs from the LR scan's {lr_sp[ax]:.4g} "
                                    f"({os.fspath(lr_path)}) along the slice axis {ax}")
    factors = (1.0 / scale[a], 1.0 / scale[b])
    if min(factors) < 1.0 - INDEX_TOLERANCE or max(factors) <= 1.0 + INDEX_TOLERANCE:
        raise InputError(pred_path, f"in-plane spacing {_fmt([pred_sp[a], pred_sp[b]])} is not finer than the LR "
                                    f"scan's {_fmt([lr_sp[a], lr_sp[b]])} ({os.fspath(lr_path)})")
    factors = (max(factors[0], 1.0), max(factors[1], 1.0))
    # Predict's grid shares its outer voxel edge (index -0.5) with the LR box it upsampled.
    corner = np.array([0.0, 0.0, 0.0, 1.0])
    corner[[a, b]] = -0.5
    lo_float = (m @ corner)[:3]
    lo_float[[a, b]] += 0.5
    box = [None, None, None]
    for d in range(3):
        lo = _integer(lo_float[d])
        if lo is None:
            raise InputError(pred_path, f"is shifted by a fraction of a voxel against {where} (its first voxel "
                                        f"starts at LR index {lo_float[d]:.3f} along axis {d}; its in-plane spacing "
                                        f"{_fmt([pred_sp[a], pred_sp[b]])} is {_fmt(factors)} times finer than the "
                                        "LR's: was it predicted from this scan, by a model for this factor?)")
        if d == ax:
            n = int(pred_shape[d])
        else:
            f = factors[0] if d == a else factors[1]
            n = max(1, int(round(pred_shape[d] / f)))
            expected = resampled_shape((n, 1, 1), -1, (f, 1.0))[0]
            if expected != int(pred_shape[d]):
                raise InputError(pred_path, f"has {pred_shape[d]} voxels along axis {d}, which no LR box upsampled by "
                                            f"{f:.4g} gives (predict writes round(n x {f:.4g}))")
        if lo < 0 or lo + n > int(lr_shape[d]):
            raise InputError(pred_path, f"covers LR voxels {lo}:{lo + n} along axis {d}, outside {where} "
                                        f"(0:{lr_shape[d]})")
        box[d] = (lo, lo + n)
    return (box[0], box[1], box[2]), factors


def hr_box(pred_path: str | os.PathLike, pred_shape: Sequence[int], pred_affine: np.ndarray,
           hr_path: str | os.PathLike, hr_shape: Sequence[int], hr_affine: np.ndarray) -> Box:
    """The box of the HR volume that the prediction's grid covers voxel for voxel.

    InputError naming the prediction when the voxel sizes or axes differ, the grids are offset by a
    fraction of a voxel, or the prediction reaches outside the HR volume.
    """
    m = np.linalg.inv(np.asarray(hr_affine, np.float64)) @ np.asarray(pred_affine, np.float64)
    if np.abs(m[:3, :3] - np.eye(3)).max() > INDEX_TOLERANCE:
        raise InputError(pred_path, f"voxel grid (spacing {_fmt(_spacing(pred_affine))}) does not match the paired "
                                    f"HR {os.fspath(hr_path)} (spacing {_fmt(_spacing(hr_affine))}, or rotated)")
    box = []
    for d in range(3):
        lo = _integer(m[d, 3])
        if lo is None:
            raise InputError(pred_path, f"is shifted by {m[d, 3]:.3f} voxels along axis {d} against the paired HR "
                                        f"{os.fspath(hr_path)} (not a whole number of voxels)")
        n = int(pred_shape[d])
        if lo < 0 or lo + n > int(hr_shape[d]):
            raise InputError(pred_path, f"shape {tuple(int(s) for s in pred_shape)} at offset {lo} along axis {d} "
                                        f"reaches outside the paired HR {os.fspath(hr_path)} "
                                        f"(shape {tuple(int(s) for s in hr_shape)})")
        box.append((lo, lo + n))
    return box[0], box[1], box[2]
