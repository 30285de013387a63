"""Unpaired LR/HR patch streams for CycleGAN training, from NIfTI folders or prepared TFRecord shards.

Each slice is read lazily, LR slices are resampled in-plane to the HR spacing (bicubic), intensities
are mapped to [0, 1] with the volume's statistics, the slice is cropped to its foreground box and cut
into ``patch_size`` patches at ``stride``; patches with too little foreground are dropped (paper,
section 3). Which patches exist is decided once, by an index pass over cheap native-resolution masks;
the streams then read exactly those patches, so patch counts, NIfTI streams and shards always agree.
:func:`make_hr_patches` gives the HR stream alone, for the supervised baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import tensorflow as tf

from .config import DataConfig
from .errors import InputError
from .files import atomic_directory, check_outside
from .patches import patches_at, select_origins
from .preprocessing import (IntensityStats, check_coarser, combine_stats, foreground_mask, resample_slice,
                            roi_bbox, volume_stats, volume_threshold)
from .volumes import Volume, find_volumes, in_plane_axes, make_output_dir, open_volume, resampled_shape

SPACING_TOLERANCE = 0.01  # volumes in one folder may differ in in-plane spacing by at most 1%
SHARD_DTYPES = ("uint16", "float16", "float32")
INDEX_NAME = "index.json"
_SHARD_BYTES = 64 << 20  # target size of one TFRecord shard
_INDEX_VERSION = 1
_INDEX_KEYS = ("patch_size", "dtype", "counts", "shards", "lr_spacing", "hr_spacing", "factors", "hr_stats",
               "lr_files", "hr_files", "data_config")


@dataclass
class _Domain:
    """The patch index of one folder (LR or HR): which patches exist in which slice, and how to load them."""

    name: str
    paths: list[Path]
    spacing: tuple[float, float]
    factors: tuple[float, float] | None  # in-plane upsampling of LR slices; None for HR
    stats: list[IntensityStats]  # per volume
    axis: int
    patch: int
    vol_ids: np.ndarray  # [S] volume of each indexed slice
    slice_ks: np.ndarray  # [S] slice number inside its volume
    boxes: np.ndarray  # [S, 4] crop (r0, r1, c0, c1) on the (resampled) slice grid
    offsets: np.ndarray  # [S + 1] slice s owns origins[offsets[s]:offsets[s + 1]]
    origins: np.ndarray  # [N, 2] patch origins inside the crop

    @property
    def n_patches(self) -> int:
        return int(self.offsets[-1])

    def slice_patches(self, s: int) -> np.ndarray:
        """``[n, p, p, 1]`` float32 patches of indexed slice ``s``, in [0, 1]."""
        s = int(s)
        vid = int(self.vol_ids[s])
        raw = _cached_volume(os.fspath(self.paths[vid])).read_slice(int(self.slice_ks[s]), axis=self.axis)
        if self.factors is not None:
            raw = resample_slice(raw, self.factors)
        r0, r1, c0, c1 = (int(v) for v in self.boxes[s])
        crop = self.stats[vid].normalize(raw[r0:r1, c0:c1])
        origins = self.origins[self.offsets[s]:self.offsets[s + 1]]
        return patches_at(crop, origins, self.patch)[..., None]

    def patches_by_position(self, positions: np.ndarray) -> np.ndarray:
        """Patches at global positions (index order), loading each slice once."""
        slices = np.searchsorted(self.offsets, positions, side="right") - 1
        out = [np.zeros((0, self.patch, self.patch, 1), np.float32)]
        for s in np.unique(slices):
            out.append(self.slice_patches(s)[positions[slices == s] - self.offsets[s]])
        return np.concatenate(out)


@functools.lru_cache(maxsize=64)
def _cached_volume(path: str) -> Volume:
    """Open volumes once per process; the streams read many slices of the same few files."""
    return open_volume(path)


@dataclass
class TrainingData:
    """Everything training needs: two unpaired, infinite patch streams plus the facts about them."""

    lr_files: list[Path]
    hr_files: list[Path]
    lr_spacing: tuple[float, float]  # in-plane, mm
    hr_spacing: tuple[float, float]
    factors: tuple[float, float]  # lr / hr spacing
    hr_stats: IntensityStats  # combine_stats of the HR volumes: maps outputs back to HR units
    lr_stats: IntensityStats | None  # combine_stats of the LR volumes: normalises scans with no statistics of their own
    n_lr_patches: int
    n_hr_patches: int
    val_lr: np.ndarray  # fixed [n_val, p, p, 1] float32 patches for image panels
    val_hr: np.ndarray
    patch_size: int
    cfg: DataConfig  # seed and shuffle buffer of the streams
    _lr_source: "_NiftiSource | _ShardSource" = dataclasses.field(repr=False)
    _hr_source: "_NiftiSource | _ShardSource" = dataclasses.field(repr=False)

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """One pass over the smaller patch set: ``min(n_lr, n_hr) // batch``, at least 1."""
        return max(1, min(self.n_lr_patches, self.n_hr_patches) // int(global_batch_size))

    def dataset(self, global_batch_size: int, input_context: tf.distribute.InputContext | None = None,
                start_step: int = 0) -> tf.data.Dataset:
        """Infinite ``(lr, hr)`` batches of ``[B, p, p, 1]`` float32 in [0, 1], from step ``start_step`` on.

        Batch ``k`` is a pure function of ``cfg.seed`` and ``k`` (see :func:`positioned_patches`), so
        the stream started at ``start_step`` is exactly the tail of the one started at 0: a resumed
        run sees the batches it would have seen. ``cfg.seed`` must be set. With an ``input_context``
        (``strategy.distribute_datasets_from_function``) batches are per replica and each input
        pipeline reads its own share of the data.
        """
        streams = [_batched_stream(source, stream_id, self.cfg, self.patch_size, global_batch_size, input_context,
                                   start_step) for stream_id, source in enumerate((self._lr_source, self._hr_source))]
        ds = tf.data.Dataset.zip(tuple(streams)).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options)


def _batched_stream(source: "_NiftiSource | _ShardSource", stream_id: int, cfg: DataConfig, patch: int,
                    global_batch_size: int, input_context: tf.distribute.InputContext | None,
                    start_step: int) -> tf.data.Dataset:
    """Batches of one source (stream 0: LR, 1: HR) from global step ``start_step`` on; with an
    ``input_context``, this input pipeline's per-replica batches of its own share of the data."""
    if cfg.seed is None:
        raise ValueError("a training stream needs data.seed (the trainer draws one when it is null)")
    batch = per_pipeline = int(global_batch_size)
    pipeline, n_pipelines = 0, 1
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(per_pipeline)
        pipeline, n_pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
        per_pipeline //= n_pipelines
    seed = _derive_seed(cfg.seed, stream_id)
    counts = source.unit_counts
    start = int(start_step) * per_pipeline
    if n_pipelines > 1 and len(counts) >= n_pipelines:  # each pipeline reads its own units
        units = np.arange(pipeline, len(counts), n_pipelines)
        patches = positioned_patches(counts[units], lambda u, o: source.load(units[u], o),
                                     _derive_seed(seed, pipeline), start, cfg.shuffle_buffer, patch)
    else:  # one stream, each pipeline taking every n-th patch of it
        patches = positioned_patches(counts, source.load, seed, start * n_pipelines + pipeline, cfg.shuffle_buffer,
                                     patch)
        if n_pipelines > 1:
            patches = patches.shard(n_pipelines, 0)
    return patches.batch(batch, drop_remainder=True)


def _derive_seed(seed: int, *salt: int) -> int:
    """Independent, reproducible 31-bit seeds for each stream and input pipeline."""
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0] & 0x7FFFFFFF)


def _order(n_units: int, seed: int, rep) -> tf.Tensor:
    """The order of the units in repetition ``rep`` of a stream: a stateless permutation of ``seed, rep``."""
    return tf.random.experimental.stateless_shuffle(tf.range(n_units, dtype=tf.int64),
                                                    seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(rep, tf.int64)]))


def positioned_patches(counts: np.ndarray, load: Callable[[int, int], np.ndarray], seed: int, start: int,
                       window: int, patch: int) -> tf.data.Dataset:
    """An infinite stream of ``[p, p, 1]`` patches whose element ``i`` depends only on ``seed`` and ``i``,
    started at element ``start`` without reading what comes before it.

    The data come in units (an indexed slice, a run of shard records) of ``counts[u]`` patches, read by
    ``load(u, offset) -> patches[offset:]``. Repetition ``r`` of the data visits every unit once, in a
    stateless permutation of ``(seed, r)``; the concatenated patches are then shuffled within fixed
    windows of ``window`` consecutive positions (window ``w`` by a permutation of ``(seed, w)``), which
    plays the part of a shuffle buffer. Starting elsewhere only needs the permutation of the
    repetition that holds the start, so a resumed run costs one unit read, not a replay of the stream.
    """
    counts = np.asarray(counts, np.int64)
    n_units, total = len(counts), int(counts.sum())
    window = max(1, int(window))
    first = start // window * window  # the shuffled window holding `start` begins here
    rep, within = divmod(first, total)
    ends = np.cumsum(counts[_order(n_units, seed, rep).numpy()])
    unit = int(np.searchsorted(ends, within, side="right"))
    offset = within - (int(ends[unit - 1]) if unit else 0)

    units = (tf.data.Dataset.range(rep, np.iinfo(np.int64).max)
             .flat_map(lambda r: tf.data.Dataset.from_tensor_slices(_order(n_units, seed, r)))
             .skip(unit).enumerate())

    def read(i, u):
        out = tf.numpy_function(lambda u_, o_: load(int(u_), int(o_)), [u, tf.where(i == 0, offset, 0)],
                                tf.float32, stateful=False)
        return tf.ensure_shape(out, [None, patch, patch, 1])

    ds = units.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    if window > 1:
        shuffle_seed = _derive_seed(seed, 1)

        def shuffle(w, batch):
            key = tf.stack([tf.constant(shuffle_seed, tf.int64), w])
            return tf.random.experimental.stateless_shuffle(batch, seed=key)

        ds = ds.batch(window).enumerate(start=first // window).map(shuffle).unbatch()
    return ds.skip(start - first)


class _NiftiSource:
    """Patches read from NIfTI slices; a unit is one indexed slice."""

    def __init__(self, domain: _Domain):
        self.domain = domain
        self.unit_counts = np.diff(domain.offsets)

    def load(self, unit: int, offset: int) -> np.ndarray:
        return self.domain.slice_patches(unit)[offset:]


class _ShardSource:
    """Patches read from the TFRecord shards of ``prepare`` by position: every record has the same
    length, so record ``k`` of a file starts at byte ``k * (16 + patch bytes)`` (TFRecord framing: an
    8-byte length and a 4-byte CRC before the data, a 4-byte CRC after it). A unit is a run of at
    most ``UNIT`` consecutive records of one file."""

    UNIT = 32

    def __init__(self, files: list[Path], counts: list[int], patch: int, dtype: str):
        self.files = [os.fspath(f) for f in files]
        self.patch = patch
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.record = patch * patch * self.dtype.itemsize
        for path, count in zip(self.files, counts):
            size = os.path.getsize(path)
            if size != count * (self.record + 16):
                raise InputError(path, f"holds {size} bytes, but index.json lists {count} records of "
                                       f"{self.record} bytes ({count * (self.record + 16)} bytes); the shard is "
                                       "damaged or was not written by `microsr-tf prepare`")
        units = [(f, k, min(self.UNIT, count - k)) for f, count in enumerate(counts)
                 for k in range(0, count, self.UNIT)]
        self.units = np.asarray(units, np.int64).reshape(-1, 3)
        self.unit_counts = self.units[:, 2]
        self.starts = np.concatenate([[0], np.cumsum(counts)])

    def read(self, file: int, first: int, n: int) -> np.ndarray:
        """``[n, p, p, 1]`` float32 patches: records ``first .. first + n`` of shard ``file``."""
        stride = self.record + 16
        with open(self.files[file], "rb") as fh:
            fh.seek(first * stride)
            raw = np.frombuffer(fh.read(n * stride), np.uint8).reshape(n, stride)[:, 12:12 + self.record]
        patches = np.ascontiguousarray(raw).view(self.dtype).astype(np.float32)
        if self.dtype.kind == "u":
            patches /= 65535.0
        return patches.reshape(n, self.patch, self.patch, 1)

    def load(self, unit: int, offset: int) -> np.ndarray:
        file, first, n = (int(v) for v in self.units[unit])
        return self.read(file, first + offset, n - offset)

    def by_position(self, positions: np.ndarray) -> np.ndarray:
        """Patches at global positions (index order)."""
        out = [np.zeros((0, self.patch, self.patch, 1), np.float32)]
        for pos in positions:
            file = int(np.searchsorted(self.starts, pos, side="right") - 1)
            out.append(self.read(file, int(pos - self.starts[file]), 1))
        return np.concatenate(out)


# ---------------------------------------------------------------------------------------------- index


def _folder_volumes(folder: str | os.PathLike, role: str, axis: int) -> tuple[list[Path], tuple[float, float]]:
    """Sorted NIfTI paths of ``folder`` and their common in-plane spacing (within 1%)."""
    if folder is None:
        raise InputError(None, f"no {role} folder given")
    paths = find_volumes(folder)
    spacing = open_volume(paths[0]).in_plane_spacing(axis)
    for path in paths[1:]:
        other = open_volume(path).in_plane_spacing(axis)
        if any(abs(a - b) > SPACING_TOLERANCE * b for a, b in zip(other, spacing)):
            raise InputError(path, f"in-plane spacing {_fmt(other)} mm differs by more than 1% from "
                                   f"{paths[0].name} ({_fmt(spacing)} mm); resample the {role} volumes "
                                   "to one spacing")
    return paths, tuple(float(s) for s in spacing)


def _fmt(spacing) -> str:
    return " x ".join(f"{s:.4g}" for s in spacing)


def _grow(lo: int, hi: int, size: int, length: int) -> tuple[int, int]:
    """Widen ``[lo, hi)`` symmetrically to at least ``size`` pixels, kept inside ``[0, length)``."""
    if hi - lo >= size:
        return lo, hi
    lo = max(0, min(lo - (size - (hi - lo)) // 2, length - size))
    return lo, min(length, lo + size)


def _index_domain(name: str, folder, paths: list[Path], spacing, factors, cfg: DataConfig) -> _Domain:
    """Decide every patch of a folder: per-slice crop boxes and foreground-filtered patch origins.

    Masks are computed on the native slice and upsampled with nearest neighbours (LR), which costs a
    fraction of the bicubic resampling the stream does; the selection only has to be consistent.
    """
    p, stride = cfg.patch_size, cfg.stride
    vol_ids, slice_ks, boxes, counts, origins, stats = [], [], [], [], [], []
    for vid, path in enumerate(paths):
        vol = open_volume(path)
        configured = cfg.roi_threshold_lr if factors is not None else cfg.roi_threshold_hr
        threshold = configured if configured is not None else volume_threshold(vol, cfg.axis)
        stats.append(volume_stats(vol, axis=cfg.axis, threshold=threshold, factors=factors))
        shape = vol.shape if factors is None else resampled_shape(vol.shape, cfg.axis, factors)
        plane = tuple(shape[i] for i in in_plane_axes(cfg.axis))
        if min(plane) < p:  # it would give no patch, yet its intensities would enter the pooled statistics
            raise InputError(path, f"its slices are {plane[0]} x {plane[1]} px at the HR spacing, smaller than the "
                                   f"{p} px patches; remove it from {name} training data or lower data.patch_size")
        for k, raw in vol.iter_slices(cfg.axis):
            mask = foreground_mask(raw, threshold)
            if factors is not None:
                mask = cv2.resize(mask.astype(np.uint8), (plane[1], plane[0]), interpolation=cv2.INTER_NEAREST)
            mask = mask.astype(bool)
            box = roi_bbox(mask.astype(np.float32), 0.5, cfg.roi_margin)
            if box is None:
                continue
            r0, r1 = _grow(box[0].start, box[0].stop, p, plane[0])
            c0, c1 = _grow(box[1].start, box[1].stop, p, plane[1])
            found = select_origins(mask[r0:r1, c0:c1], p, stride, cfg.min_foreground)
            if len(found):
                vol_ids.append(vid)
                slice_ks.append(k)
                boxes.append((r0, r1, c0, c1))
                counts.append(len(found))
                origins.append(found)
    if not counts:
        raise InputError(folder, f"no {p} px {name} patch has >= {cfg.min_foreground:.0%} foreground; lower "
                                 f"data.min_foreground or set data.roi_threshold_{name.lower()}")
    return _Domain(name=name, paths=paths, spacing=spacing, factors=factors, stats=stats, axis=cfg.axis, patch=p,
                   vol_ids=np.asarray(vol_ids, np.int32), slice_ks=np.asarray(slice_ks, np.int32),
                   boxes=np.asarray(boxes, np.int32), offsets=np.concatenate([[0], np.cumsum(counts)]),
                   origins=np.concatenate(origins).astype(np.int32))


def _index_folders(lr_dir, hr_dir, cfg: DataConfig) -> tuple[_Domain, _Domain]:
    """Validate both folders and index their patches."""
    lr_paths, lr_spacing = _folder_volumes(lr_dir, "LR", cfg.axis)
    hr_paths, hr_spacing = _folder_volumes(hr_dir, "HR", cfg.axis)
    factors = check_coarser(lr_dir, lr_spacing, hr_spacing)
    lr = _index_domain("LR", lr_dir, lr_paths, lr_spacing, factors, cfg)
    hr = _index_domain("HR", hr_dir, hr_paths, hr_spacing, None, cfg)
    return lr, hr


def _val_positions(n_patches: int, n_val: int) -> np.ndarray:
    """Evenly spread, fixed positions of the validation patches in index order."""
    return np.unique(np.linspace(0, n_patches - 1, min(n_val, n_patches)).round().astype(np.int64))


# ---------------------------------------------------------------------------------------------- public


def make_training_data(lr_dir: str | os.PathLike | None, hr_dir: str | os.PathLike | None, cfg: DataConfig,
                       n_val: int = 4) -> TrainingData:
    """Index unpaired LR and HR NIfTI folders (or open ``cfg.shards_dir``) and describe the two streams.

    With ``cfg.shards_dir`` set the folders are not read: the shards and their ``index.json`` define
    the data. Every user mistake raises a one-line :class:`InputError`.
    """
    cfg.validate()
    if cfg.shards_dir is not None:
        return _shard_training_data(Path(cfg.shards_dir), cfg, n_val)
    lr, hr = _index_folders(lr_dir, hr_dir, cfg)
    return TrainingData(
        lr_files=lr.paths, hr_files=hr.paths, lr_spacing=lr.spacing, hr_spacing=hr.spacing, factors=lr.factors,
        hr_stats=combine_stats(hr.stats), lr_stats=combine_stats(lr.stats), n_lr_patches=lr.n_patches, n_hr_patches=hr.n_patches,
        val_lr=lr.patches_by_position(_val_positions(lr.n_patches, n_val)),
        val_hr=hr.patches_by_position(_val_positions(hr.n_patches, n_val)),
        patch_size=cfg.patch_size, cfg=cfg, _lr_source=_NiftiSource(lr), _hr_source=_NiftiSource(hr))


def prepare_shards(lr_dir: str | os.PathLike, hr_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   cfg: DataConfig, dtype: str = "uint16", shard_bytes: int = _SHARD_BYTES) -> Path:
    """Write every training patch once into TFRecord shards plus ``index.json``; returns ``out_dir``.

    Patches are stored in index order as raw little-endian ``dtype`` records (``uint16`` quantises
    [0, 1] to 1/65535 steps at half the size of float32). The folder appears atomically: it is
    written under a temporary name beside ``out_dir`` and renamed into place.
    """
    if dtype not in SHARD_DTYPES:
        raise ValueError(f"shard dtype must be one of {SHARD_DTYPES}, got {dtype!r}")
    cfg = dataclasses.replace(cfg, shards_dir=None)
    cfg.validate()
    out = Path(out_dir)
    check_outside(out, (lr_dir, hr_dir))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "already exists and is not an empty folder; choose a new output folder")
    lr, hr = _index_folders(lr_dir, hr_dir, cfg)
    make_output_dir(out.parent)
    with atomic_directory(out) as tmp:
        shards = {dom.name.lower(): _write_domain(dom, tmp, dtype, shard_bytes) for dom in (lr, hr)}
        index = {
            "version": _INDEX_VERSION,
            "patch_size": cfg.patch_size,
            "dtype": dtype,
            "counts": {"lr": lr.n_patches, "hr": hr.n_patches},
            "shards": shards,
            "lr_spacing": list(lr.spacing),
            "hr_spacing": list(hr.spacing),
            "factors": list(lr.factors),
            "hr_stats": combine_stats(hr.stats).to_dict(),
            "lr_stats": combine_stats(lr.stats).to_dict(),
            "lr_files": [os.fspath(p) for p in lr.paths],
            "hr_files": [os.fspath(p) for p in hr.paths],
            "data_config": dataclasses.asdict(cfg),
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return out


def _write_domain(dom: _Domain, folder: Path, dtype: str, shard_bytes: int) -> list[dict]:
    """Stream one domain's patches, in index order, into ``<lr|hr>-XXXXX-of-YYYYY.tfrecord`` files."""
    prefix = dom.name.lower()
    n = dom.n_patches
    n_shards = min(n, max(1, math.ceil(n * dom.patch * dom.patch * np.dtype(dtype).itemsize / shard_bytes)))
    bounds = np.linspace(0, n, n_shards + 1).round().astype(np.int64)
    names = [f"{prefix}-{i:05d}-of-{n_shards:05d}.tfrecord" for i in range(n_shards)]
    shard, written = 0, 0
    writer = tf.io.TFRecordWriter(os.fspath(folder / names[0]))
    try:
        for s in range(len(dom.slice_ks)):
            for patch in dom.slice_patches(s):
                if written == bounds[shard + 1]:
                    writer.close()
                    shard += 1
                    writer = tf.io.TFRecordWriter(os.fspath(folder / names[shard]))
                writer.write(_encode(patch[..., 0], dtype))
                written += 1
    finally:
        writer.close()
    return [{"file": name, "count": int(hi - lo)} for name, lo, hi in zip(names, bounds[:-1], bounds[1:])]


def _encode(patch: np.ndarray, dtype: str) -> bytes:
    if dtype == "uint16":
        patch = np.round(np.clip(patch, 0.0, 1.0) * 65535.0)
    return patch.astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def read_shard_index(shards_dir: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of a shards folder, checked for the files it names."""
    shards_dir = Path(shards_dir)
    path = shards_dir / INDEX_NAME
    if not shards_dir.is_dir():
        raise InputError(shards_dir, "shards folder not found")
    if not path.is_file():
        raise InputError(shards_dir, f"no {INDEX_NAME}; not a folder written by `microsr-tf prepare`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("version") != _INDEX_VERSION:
            raise InputError(path, f"unsupported shard index version {index.get('version')!r}")
        missing = [key for key in _INDEX_KEYS if key not in index]
        if missing:
            raise InputError(path, f"shard index lacks {', '.join(missing)}")
        if index["dtype"] not in SHARD_DTYPES:
            raise InputError(path, f"unknown patch dtype {index['dtype']!r} (expected one of {SHARD_DTYPES})")
        for domain in ("lr", "hr"):
            for entry in index["shards"][domain]:
                if not (shards_dir / entry["file"]).is_file():
                    raise InputError(shards_dir / entry["file"], "shard listed in index.json is missing")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(path, f"not a valid shard index ({type(exc).__name__}: {exc})") from None
    return index


# the settings that decide which patches a folder gives: fixed in the shards when they are prepared
SHARD_SETTINGS = ("patch_size", "stride", "min_foreground", "roi_threshold_lr", "roi_threshold_hr", "roi_margin",
                  "axis")


def _check_shard_settings(shards_dir: Path, index: dict, cfg: DataConfig) -> None:
    """The run's data settings must be those the shards were prepared with: the run records them (and
    its generator the ROI threshold that ``predict`` reuses), so other values would describe patches it
    never saw."""
    prepared = index["data_config"] if isinstance(index["data_config"], dict) else {}
    prepared = {**prepared, "patch_size": index["patch_size"]}
    for name in SHARD_SETTINGS:
        if name in prepared and prepared[name] != getattr(cfg, name):
            raise InputError(shards_dir / INDEX_NAME, f"these shards were prepared with data.{name} "
                                                      f"{prepared[name]!r} but it is {getattr(cfg, name)!r} here; "
                                                      f"set data.{name} to {prepared[name]!r} or prepare them again")


def _shard_training_data(shards_dir: Path, cfg: DataConfig, n_val: int) -> TrainingData:
    index = read_shard_index(shards_dir)
    _check_shard_settings(shards_dir, index, cfg)
    p, dtype = int(index["patch_size"]), index["dtype"]
    sources, val = {}, {}
    for domain in ("lr", "hr"):
        entries = index["shards"][domain]
        source = _ShardSource([shards_dir / e["file"] for e in entries], [e["count"] for e in entries], p, dtype)
        sources[domain] = source
        val[domain] = source.by_position(_val_positions(index["counts"][domain], n_val))
    return TrainingData(
        lr_files=[Path(f) for f in index["lr_files"]], hr_files=[Path(f) for f in index["hr_files"]],
        lr_spacing=tuple(index["lr_spacing"]), hr_spacing=tuple(index["hr_spacing"]),
        factors=tuple(index["factors"]), hr_stats=IntensityStats.from_dict(index["hr_stats"]),
        lr_stats=IntensityStats.from_dict(index["lr_stats"]) if "lr_stats" in index else None,
        n_lr_patches=int(index["counts"]["lr"]), n_hr_patches=int(index["counts"]["hr"]),
        val_lr=val["lr"], val_hr=val["hr"], patch_size=p, cfg=cfg,
        _lr_source=sources["lr"], _hr_source=sources["hr"])



# ---------------------------------------------------------------------------------------------- HR only


@dataclass
class HRPatches:
    """The HR patch stream alone, with the LR folder's spacing: what supervised training reads.

    The LR volumes are opened for their in-plane spacing (which sets the degradation factors) and
    nothing else; no LR slice is read.
    """

    lr_files: list[Path]
    hr_files: list[Path]
    lr_spacing: tuple[float, float]
    hr_spacing: tuple[float, float]
    factors: tuple[float, float]  # lr / hr spacing
    hr_stats: IntensityStats
    n_patches: int
    val: np.ndarray  # fixed [n_val, p, p, 1] float32 patches for image panels
    patch_size: int
    cfg: DataConfig
    _source: "_NiftiSource | _ShardSource" = dataclasses.field(repr=False)

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """One pass over the HR patches: ``n // batch``, at least 1."""
        return max(1, self.n_patches // int(global_batch_size))

    def dataset(self, global_batch_size: int, input_context: tf.distribute.InputContext | None = None,
                start_step: int = 0) -> tf.data.Dataset:
        """Infinite ``[B, p, p, 1]`` float32 HR batches from step ``start_step`` on, the HR stream of
        :class:`TrainingData` (deterministic by position; ``cfg.seed`` must be set)."""
        ds = _batched_stream(self._source, 1, self.cfg, self.patch_size, global_batch_size, input_context, start_step)
        options = tf.data.Options()
        options.deterministic = True
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def make_hr_patches(lr_dir: str | os.PathLike | None, hr_dir: str | os.PathLike | None, cfg: DataConfig,
                    n_val: int = 4) -> HRPatches:
    """Index the HR folder's patches (or open ``cfg.shards_dir``'s HR shards) and read the LR spacing.

    Every user mistake raises a one-line :class:`InputError`, as :func:`make_training_data`.
    """
    cfg.validate()
    if cfg.shards_dir is not None:
        shards_dir = Path(cfg.shards_dir)
        index = read_shard_index(shards_dir)
        _check_shard_settings(shards_dir, index, cfg)
        entries = index["shards"]["hr"]
        source = _ShardSource([shards_dir / e["file"] for e in entries], [e["count"] for e in entries],
                              cfg.patch_size, index["dtype"])
        n = int(index["counts"]["hr"])
        return HRPatches(
            lr_files=[Path(f) for f in index["lr_files"]], hr_files=[Path(f) for f in index["hr_files"]],
            lr_spacing=tuple(index["lr_spacing"]), hr_spacing=tuple(index["hr_spacing"]),
            factors=tuple(index["factors"]), hr_stats=IntensityStats.from_dict(index["hr_stats"]), n_patches=n,
            val=source.by_position(_val_positions(n, n_val)),
            patch_size=cfg.patch_size, cfg=cfg, _source=source)
    lr_paths, lr_spacing = _folder_volumes(lr_dir, "LR", cfg.axis)
    hr_paths, hr_spacing = _folder_volumes(hr_dir, "HR", cfg.axis)
    factors = check_coarser(lr_dir, lr_spacing, hr_spacing)
    hr = _index_domain("HR", hr_dir, hr_paths, hr_spacing, None, cfg)
    return HRPatches(
        lr_files=lr_paths, hr_files=hr.paths, lr_spacing=lr_spacing, hr_spacing=hr.spacing, factors=factors,
        hr_stats=combine_stats(hr.stats), n_patches=hr.n_patches,
        val=hr.patches_by_position(_val_positions(hr.n_patches, n_val)), patch_size=cfg.patch_size, cfg=cfg,
        _source=_NiftiSource(hr))
