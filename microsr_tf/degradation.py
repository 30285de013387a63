"""Synthetic training pairs for the supervised baselines, made the paper's way (section 3): HR patches
degraded to the LR voxel size by bicubic downsampling plus Gaussian noise, then upsampled back.

Each HR patch (``p x p``, normalised to [0, 1]) is

1. downsampled to ``round(p / f)`` pixels per axis (``f`` = LR / HR spacing) with the Keys cubic
   kernel (a = -0.5) stretched by the factor, i.e. anti-aliased as MATLAB's ``imresize``
   (``tf.image.resize(..., "bicubic", antialias=True)``);
2. given white Gaussian noise of std ``noise_std`` on that LR grid (normalised units);
3. upsampled back to ``p x p`` with :func:`microsr_tf.preprocessing.resample_slice`, the Keys bicubic
   that prediction applies to real LR slices, and clipped to [0, 1] as normalised slices are.

A patch's LR grid has a whole number of pixels, so the factor actually used is ``p / round(p / f)``
(8 for 64 px patches at f = 8.33; 8.26 for 256 px). A patch size whose factor would be more than
5% off ``f`` is refused before training, naming sizes that fit: a network trained at 7.2x does not
do 8x. Pixel centres are aligned on both grids
(half-pixel convention), so the degraded patch lies exactly over its HR patch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from .config import DataConfig
from .errors import ConfigError
from .pipeline import HRPatches, make_hr_patches
from .preprocessing import IntensityStats, resample_slice

_VAL_SEED = (20210413, 0)  # fixed noise of the validation pairs shown in TensorBoard
FACTOR_TOLERANCE = 0.05  # largest relative gap between the factor a patch's LR grid gives and the data's


@dataclass(frozen=True)
class Degradation:
    """The paper's synthetic LR of an HR patch: ``factors`` (LR / HR spacing per in-plane axis) and
    ``noise_std`` (normalised units)."""

    factors: tuple[float, float]
    noise_std: float

    def __post_init__(self) -> None:
        if len(self.factors) != 2 or min(self.factors) < 1.0:
            raise ConfigError(f"degradation factors must be two numbers >= 1, got {self.factors}")
        if not self.noise_std >= 0:
            raise ConfigError(f"degradation noise std must be >= 0, got {self.noise_std}")

    def lr_shape(self, hr_shape: tuple[int, int]) -> tuple[int, int]:
        """Pixels of the LR grid of a ``hr_shape`` patch: ``round(n / f)``, at least 1."""
        return tuple(max(1, round(n / f)) for n, f in zip(hr_shape, self.factors))

    def downsample(self, hr: tf.Tensor) -> tf.Tensor:
        """``[B, H, W, 1]`` -> ``[B, h, w, 1]`` on the LR grid, anti-aliased Keys bicubic."""
        hr = tf.convert_to_tensor(hr, tf.float32)
        size = self.lr_shape((int(hr.shape[1]), int(hr.shape[2])))
        return tf.image.resize(hr, size, method="bicubic", antialias=True)

    def add_noise(self, lr: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """``lr`` plus N(0, noise_std^2) per pixel, drawn from the stateless ``seed`` (two integers)."""
        if self.noise_std == 0:
            return lr
        return lr + self.noise_std * tf.random.stateless_normal(tf.shape(lr), seed=seed, dtype=lr.dtype)

    def upsample(self, lr: np.ndarray, hr_shape: tuple[int, int]) -> np.ndarray:
        """``[B, h, w, 1]`` -> ``[B, H, W, 1]`` float32 with :func:`resample_slice` (Keys bicubic)."""
        lr = np.asarray(lr, np.float32)
        factors = tuple(n / m for n, m in zip(hr_shape, lr.shape[1:3]))
        return np.stack([resample_slice(img[..., 0], factors) for img in lr])[..., None]

    def __call__(self, hr: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """The degraded ``[B, H, W, 1]`` float32 input for ``hr``, in [0, 1]; works eagerly and in graphs."""
        hr = tf.convert_to_tensor(hr, tf.float32)
        hr_shape = (int(hr.shape[1]), int(hr.shape[2]))
        noisy = self.add_noise(self.downsample(hr), seed)
        up = tf.numpy_function(lambda a: self.upsample(a, hr_shape), [noisy], tf.float32, stateful=False)
        return tf.clip_by_value(tf.ensure_shape(up, hr.shape), 0.0, 1.0)


@dataclass
class PairedData:
    """Infinite ``(degraded, hr)`` batches from the HR patch stream, and the facts training records.

    Offers what the trainer reads of :class:`~microsr_tf.pipeline.TrainingData`: spacings, factors,
    HR statistics, fixed validation pairs, ``steps_per_epoch`` and ``dataset``.
    """

    hr: HRPatches
    degradation: Degradation
    val_lr: np.ndarray  # the validation HR patches, degraded with a fixed seed
    val_hr: np.ndarray
    seed: int | None  # data.seed; the trainer draws one when it is null
    # No LR voxel is read, so there are no pooled LR statistics (predict --normalize model needs them;
    # the per-scan default does not).
    lr_stats: None = None

    lr_files: list[Path] = dataclasses.field(init=False)
    hr_files: list[Path] = dataclasses.field(init=False)
    lr_spacing: tuple[float, float] = dataclasses.field(init=False)
    hr_spacing: tuple[float, float] = dataclasses.field(init=False)
    factors: tuple[float, float] = dataclasses.field(init=False)
    hr_stats: IntensityStats = dataclasses.field(init=False)
    patch_size: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        for name in ("lr_files", "hr_files", "lr_spacing", "hr_spacing", "factors", "hr_stats", "patch_size"):
            setattr(self, name, getattr(self.hr, name))

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """One pass over the HR patches."""
        return self.hr.steps_per_epoch(global_batch_size)

    def dataset(self, global_batch_size: int, input_context: tf.distribute.InputContext | None = None,
                start_step: int = 0) -> tf.data.Dataset:
        """Infinite ``(lr, hr)`` batches of ``[B, p, p, 1]`` float32 from step ``start_step`` on; batch ``i``
        of input pipeline ``k`` draws its noise from the stateless seed ``(s, i)`` with ``s`` derived from
        ``(data.seed, k)``, so the stream is deterministic by position (``data.seed`` must be set)."""
        if self.seed is None:
            raise ValueError("a training stream needs data.seed (the trainer draws one when it is null)")
        pipeline = 0 if input_context is None else input_context.input_pipeline_id
        per_step = 1 if input_context is None else input_context.num_replicas_in_sync // input_context.num_input_pipelines
        stream_seed = int(np.random.SeedSequence([self.seed, 2, pipeline]).generate_state(1)[0] & 0x7FFFFFFF)

        def pair(index, hr):
            seed = tf.stack([tf.constant(stream_seed, tf.int64), index])
            return self.degradation(hr, seed), hr

        ds = self.hr.dataset(global_batch_size, input_context, start_step).enumerate(start=int(start_step) * per_step)
        return ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def check_patch_fits_factor(patch_size: int, factors: tuple[float, float]) -> None:
    """Refuse a patch size whose whole-pixel LR grid gives a factor more than :data:`FACTOR_TOLERANCE`
    off the data's, naming the two nearest sizes that fit (whole multiples of the factor)."""
    for f in factors:
        n = max(1, round(patch_size / f))
        used = patch_size / n
        if abs(used / f - 1) > FACTOR_TOLERANCE:
            fits = {round(k * f) for k in (n - 1, n, n + 1) if k >= 1} - {patch_size}
            hint = " or ".join(str(p) for p in sorted(sorted(fits, key=lambda p: abs(p - patch_size))[:2]))
            raise ConfigError(
                f"data.patch_size {patch_size} gives an LR grid of {n} px, i.e. a factor of {used:.2f} where "
                f"the data's is {f:.2f} ({abs(used / f - 1):.0%} off); a network trained so would not "
                f"super-resolve at the data's factor: use a patch size such as {hint}")


def make_paired_data(lr_dir: str | os.PathLike | None, hr_dir: str | os.PathLike | None, cfg: DataConfig,
                     n_val: int = 4) -> PairedData:
    """Supervised pairs from the HR folder (or shards), degraded to the LR folder's voxel size with
    ``cfg.degradation_noise``; the LR folder is read for its spacing only."""
    hr = make_hr_patches(lr_dir, hr_dir, cfg, n_val=n_val)
    degradation = Degradation(tuple(float(f) for f in hr.factors), float(cfg.degradation_noise))
    check_patch_fits_factor(hr.patch_size, degradation.factors)
    val_lr = degradation(hr.val, tf.constant(_VAL_SEED, tf.int64)).numpy() if len(hr.val) else hr.val
    return PairedData(hr=hr, degradation=degradation, val_lr=val_lr, val_hr=hr.val, seed=cfg.seed)
