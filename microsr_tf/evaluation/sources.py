"""Things the evaluation reads slice by slice: in-memory arrays, boxes of a volume, and bicubic upsampling.

Each class has the reading interface of :class:`microsr_tf.volumes.Volume` (``shape``, ``path``,
``n_slices``, ``slice_shape``, ``read_slice``, ``iter_slices``), so the evaluation, and
:func:`microsr_tf.preprocessing.volume_stats`, treat NIfTI files, numpy arrays and computed volumes alike
and never hold more than a few slices.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..preprocessing import IntensityStats, resample_slice
from ..volumes import in_plane_axes, resampled_shape

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _axis(axis: int) -> int:
    if not -3 <= int(axis) <= 2:
        raise ValueError(f"axis must be in [-3, 2] for a 3-D volume, got {axis}")
    return int(axis) % 3


class _Reader:
    """Shared slice-reading helpers; subclasses set ``shape`` and ``path`` and define ``read_slice(k, axis)``."""

    shape: tuple[int, int, int]
    path: str

    def n_slices(self, axis: int = -1) -> int:
        return self.shape[_axis(axis)]

    def slice_shape(self, axis: int = -1) -> tuple[int, int]:
        a, b = in_plane_axes(axis)
        return self.shape[a], self.shape[b]

    def iter_slices(self, axis: int = -1, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        ks = range(self.n_slices(axis)) if indices is None else sorted(set(int(k) for k in indices))
        for k in ks:
            yield k, self.read_slice(k, axis)


class ArrayVolume(_Reader):
    """A 3-D numpy array read like a NIfTI volume (``spacing`` in mm, ``affine`` voxel -> world)."""

    def __init__(self, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 affine: np.ndarray | None = None, path: str = "<array>"):
        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"{path}: expected a 3-D array, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(f"{path}: expected real numbers, got {array.dtype}")
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.affine = np.diag([*self.spacing, 1.0]) if affine is None else np.asarray(affine, np.float64)
        self.path = path

    def read_slice(self, k: int, axis: int = -1) -> np.ndarray:
        arr = np.take(self.array, int(k), axis=_axis(axis)).astype(np.float32)
        if not np.isfinite(arr).all():
            raise InputError(self.path, f"slice {k} along axis {_axis(axis)} has NaN or Inf values")
        return arr


class SubVolume(_Reader):
    """The half-open voxel box ``((i0, i1), (j0, j1), (k0, k1))`` of another volume, indexed from 0."""

    def __init__(self, parent, box: Box):
        self.parent = parent
        self.box = tuple((int(lo), int(hi)) for lo, hi in box)
        for (lo, hi), n in zip(self.box, parent.shape):
            if not 0 <= lo < hi <= n:
                raise ValueError(f"{parent.path}: box {self.box} is outside the volume's shape {parent.shape}")
        self.shape = tuple(hi - lo for lo, hi in self.box)
        self.path = os.fspath(parent.path)

    def _crop(self, arr: np.ndarray, ax: int) -> np.ndarray:
        (a0, a1), (b0, b1) = (self.box[d] for d in in_plane_axes(ax))
        return arr[a0:a1, b0:b1]

    def read_slice(self, k: int, axis: int = -1) -> np.ndarray:
        ax = _axis(axis)
        return self._crop(self.parent.read_slice(int(k) + self.box[ax][0], ax), ax)

    def iter_slices(self, axis: int = -1, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        ax = _axis(axis)
        lo = self.box[ax][0]
        ks = range(self.shape[ax]) if indices is None else sorted(set(int(k) for k in indices))
        for k, arr in self.parent.iter_slices(ax, [k + lo for k in ks]):
            yield k - lo, self._crop(arr, ax)


class BicubicVolume(_Reader):
    """Bicubic upsampling of an LR volume in HR units, exactly as ``predict`` prepares the network's input.

    Each LR slice is resampled in-plane by ``factors`` (Keys bicubic, :func:`resample_slice`), mapped to
    [0, 1] with the LR volume's statistics ``lr_stats`` and back out with the HR statistics ``hr_stats``:
    what the network would output if it were the identity.
    """

    def __init__(self, lr, factors: Sequence[float], lr_stats: IntensityStats, hr_stats: IntensityStats,
                 axis: int = -1):
        self.lr = lr
        self.axis = _axis(axis)
        self.factors = tuple(float(f) for f in factors)
        self.lr_stats, self.hr_stats = lr_stats, hr_stats
        self.shape = tuple(int(n) for n in resampled_shape(lr.shape, self.axis, self.factors))
        self.path = f"bicubic upsampling of {lr.path}"

    def _convert(self, arr: np.ndarray) -> np.ndarray:
        return self.hr_stats.denormalize(self.lr_stats.normalize(resample_slice(arr, self.factors)))

    def _check_axis(self, axis: int) -> int:
        if _axis(axis) != self.axis:
            raise ValueError(f"{self.path}: slices only along axis {self.axis}, got {axis}")
        return self.axis

    def read_slice(self, k: int, axis: int = -1) -> np.ndarray:
        return self._convert(self.lr.read_slice(k, self._check_axis(axis)))

    def iter_slices(self, axis: int = -1, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for k, arr in self.lr.iter_slices(self._check_axis(axis), indices):
            yield k, self._convert(arr)
