"""One typed configuration for data, model and training, loadable from YAML, overridable by flags.

Defaults follow the paper (section 2 "Implementation", section 3): 256 px patches at stride 128,
batch 5, Adam at 1e-4, 50 epochs, lambda_rec = 10, lambda_adv = 1, nine residual blocks, T = 100.
``model.method`` picks the paper's CycleGAN or one of its supervised baselines (U-Net, SRGAN), which
train on HR patches degraded the paper's way (``data.degradation_noise``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from .errors import ConfigError, InputError
from .files import atomic_write_text

DROPOUT_POSITIONS = ("bottleneck", "resblocks", "none")
UPSAMPLE_KINDS = ("transpose", "resize", "bilinear")
DECODER_NORMS = ("instance", "none")
DECODER_BLURS = ("none", "binomial")
GAN_LOSSES = ("bce", "lsgan")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
PRECISIONS = ("float32", "mixed_bfloat16")  # training: Keras dtype policies (float32 weights either way)
INFERENCE_PRECISIONS = ("float32", "bfloat16")  # prediction: convolution precision of the Monte Carlo passes
MAX_SEED = 2**31 - 1  # every seed ends up in int32 tensors (dropout seed rows, tf.data, stateless ops)
MAX_SERVED_SAMPLES = 1000  # Monte Carlo samples one request to an exported model may ask for
MAX_SAMPLES = 10_000  # Monte Carlo samples of a local prediction: a mistyped T would otherwise run for days
METHODS = ("cyclegan", "unet", "srgan")  # the paper's model and its two supervised baselines


@dataclass
class DataConfig:
    """How slices become training patches."""

    patch_size: int = 256
    stride: int = 128
    min_foreground: float = 0.1  # reject patches with less foreground than this fraction
    roi_threshold_lr: float | None = None  # foreground threshold of LR volumes in their units; None: Otsu per volume
    roi_threshold_hr: float | None = None  # the same for HR volumes (another scanner, other units)
    roi_margin: int = 16  # pixels kept around the per-slice bounding box
    axis: int = -1  # slice axis of the input volumes
    shuffle_buffer: int = 512
    seed: int | None = None  # order of the patch streams; None: drawn at the start of a run (and kept on resume)
    lr_dir: str | None = None  # folder of LR (clinical CT) volumes; the run remembers it for --resume
    hr_dir: str | None = None  # folder of HR (micro-CT) volumes
    shards_dir: str | None = None  # stream from `microsr-tf prepare` TFRecord shards instead
    # Supervised baselines (model.method unet/srgan) train on HR patches degraded to the LR voxel size
    # (anti-aliased bicubic) plus Gaussian noise of this std on the LR grid, in normalised [0, 1] units;
    # the `small` phantoms' cone-beam noise is about 0.07 in these units.
    degradation_noise: float = 0.05

    def validate(self) -> None:
        if self.patch_size < 8 or self.patch_size % 4:
            raise ConfigError(f"data.patch_size must be a multiple of 4 and >= 8, got {self.patch_size}")
        if self.stride < 1:
            raise ConfigError(f"data.stride must be positive, got {self.stride}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ConfigError(f"data.min_foreground must be in [0, 1], got {self.min_foreground}")
        if self.roi_margin < 0:
            raise ConfigError(f"data.roi_margin must be >= 0, got {self.roi_margin}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not -3 <= self.axis <= 2:
            raise ConfigError(f"data.axis must be 0, 1 or 2 (or -3..-1 from the end), got {self.axis}")
        if self.degradation_noise < 0:
            raise ConfigError(f"data.degradation_noise must be >= 0, got {self.degradation_noise}")
        _check_seed("data.seed", self.seed)


@dataclass
class ModelConfig:
    """Generator and critic architecture (ResNet generator, 70x70 PatchGAN).

    ``method`` "unet" and "srgan" reuse the sizes: ``ngf`` is the U-Net's first-level and the SRGAN
    generator's filters, ``n_blocks`` the SRGAN generator's residual blocks, ``ndf`` the SRGAN critic's
    first filters; the dropout and PatchGAN settings apply to the CycleGAN only.
    """

    method: str = "cyclegan"  # "cyclegan" (the paper), or the supervised baselines "unet" and "srgan"
    ngf: int = 64  # generator base filters
    n_blocks: int = 9  # residual blocks in the generator trunk
    upsample: str = "transpose"  # "transpose" (paper), "resize" (nearest + conv) or "bilinear" (bilinear + conv)
    dropout_rate: float = 0.5
    dropout_position: str = "bottleneck"  # "bottleneck", "resblocks" or "none"
    decoder_norm: str = "instance"  # "instance" (CycleGAN) or "none": a local decoder, exact in stripes
    decoder_blur: str = "none"  # "binomial": a fixed [1,2,1]^2 blur after each upsampling's activation (anti-aliasing)
    ndf: int = 64  # critic base filters
    n_layers_d: int = 3  # stride-2 layers in the PatchGAN critic (3 -> 70x70 receptive field)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"model.method must be one of {METHODS}, got {self.method!r}")
        if self.ngf < 1 or self.ndf < 1:
            raise ConfigError("model.ngf and model.ndf must be positive")
        if self.n_blocks < 0:
            raise ConfigError(f"model.n_blocks must be >= 0, got {self.n_blocks}")
        if self.upsample not in UPSAMPLE_KINDS:
            raise ConfigError(f"model.upsample must be one of {UPSAMPLE_KINDS}, got {self.upsample!r}")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ConfigError(
                f"model.dropout_position must be one of {DROPOUT_POSITIONS}, got {self.dropout_position!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"model.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.decoder_norm not in DECODER_NORMS:
            raise ConfigError(f"model.decoder_norm must be one of {DECODER_NORMS}, got {self.decoder_norm!r}")
        if self.decoder_blur not in DECODER_BLURS:
            raise ConfigError(f"model.decoder_blur must be one of {DECODER_BLURS}, got {self.decoder_blur!r}")
        if self.n_layers_d < 1:
            raise ConfigError(f"model.n_layers_d must be >= 1, got {self.n_layers_d}")


@dataclass
class TrainConfig:
    """Optimisation, losses, logging and checkpointing."""

    epochs: int = 50
    steps_per_epoch: int | None = None  # None: one pass over the smaller of the two patch sets
    batch_size: int = 5  # global batch size, split across replicas
    learning_rate: float = 1e-4
    beta_1: float = 0.5
    decay_start_epoch: int | None = None  # linear decay to 0 from this epoch on; None: constant
    lambda_rec: float = 10.0
    lambda_adv: float = 1.0
    lambda_identity: float = 0.0  # identity loss weight (relative to lambda_rec); 0 disables it
    lambda_lr_consistency: float = 0.0  # beyond the paper: G_L(x) brought back to the LR grid must correlate with x
    lambda_periodic: float = 0.0  # beyond the paper: penalises G_L(x)'s power at the 2 and 4 px lattice frequencies
    gan_loss: str = "bce"  # "bce" (log loss, the paper) or "lsgan"
    pool_size: int = 0  # history of generated images for the critics; 0 disables, 50 as CycleGAN
    srgan_adv_weight: float = 1e-3  # SRGAN: weight of the adversarial term next to the pixel MSE (Ledig et al.)
    strategy: str = "auto"
    precision: str = "float32"  # "mixed_bfloat16": bf16 compute, float32 weights (fast on AMX/BF16 CPUs, GPUs)
    checkpoint_every: int = 100  # steps between checkpoints
    log_every: int = 10  # steps between scalar summaries
    image_every: int = 100  # steps between TensorBoard image panels
    n_val_patches: int = 4  # fixed validation patches shown in the image panel
    mc_samples_val: int = 8  # MC dropout samples for the variance map in the panel
    seed: int | None = 0  # weights, dropout masks, image pool; None: drawn at the start of a run (and kept)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"train.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.beta_1 < 1.0:
            raise ConfigError(f"train.beta_1 must be in [0, 1), got {self.beta_1}")
        for name in ("lambda_rec", "lambda_adv", "lambda_identity", "lambda_lr_consistency", "lambda_periodic",
                     "srgan_adv_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.gan_loss not in GAN_LOSSES:
            raise ConfigError(f"train.gan_loss must be one of {GAN_LOSSES}, got {self.gan_loss!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.pool_size < 0:
            raise ConfigError(f"train.pool_size must be >= 0, got {self.pool_size}")
        if self.decay_start_epoch is not None and not 0 <= self.decay_start_epoch < self.epochs:
            raise ConfigError("train.decay_start_epoch must be in [0, epochs)")
        for name in ("checkpoint_every", "log_every", "image_every", "n_val_patches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.mc_samples_val < 2:
            raise ConfigError(f"train.mc_samples_val must be >= 2 (a variance needs two samples), "
                              f"got {self.mc_samples_val}")
        _check_seed("train.seed", self.seed)


def _check_seed(key: str, seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{key} must be in [0, {MAX_SEED}] or null, got {seed}")


@dataclass
class Config:
    """The whole run: data, model and training sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "Config":
        """Build from nested ``{section: {key: value}}``; unknown sections or keys are errors."""
        cfg = cls()
        return cfg.override(raw, source)

    def override(self, raw: Mapping[str, Any] | None, source: str = "override",
                 unset: bool = False) -> "Config":
        """Return a validated copy with ``raw`` (nested mapping) applied.

        ``unset=True`` reads a None value as "not given" (flags left out) and skips it; otherwise None
        sets a nullable key to None and is refused for any other key.
        """
        new = dataclasses.replace(
            self,
            data=dataclasses.replace(self.data),
            model=dataclasses.replace(self.model),
            train=dataclasses.replace(self.train),
        )
        if raw is not None:
            new._apply(raw, source, unset)
        try:
            return new.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def _apply(self, raw: Mapping[str, Any], source: str, unset: bool) -> None:
        """Set the values of nested mapping ``raw`` in place, checking section names, keys and types."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        sections = {f.name for f in dataclasses.fields(self)}
        for section, values in raw.items():
            if section not in sections:
                raise ConfigError(f"{source}: unknown config section {section!r} (known: {sorted(sections)})")
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise ConfigError(f"{source}: section {section!r} must be a mapping")
            target = getattr(self, section)
            types = _field_types(type(target))
            for key, value in values.items():
                if key not in types:
                    raise ConfigError(
                        f"{source}: unknown config key {section}.{key} (known: {', '.join(sorted(types))})")
                if value is None and unset:
                    continue
                setattr(target, key, _coerce(value, *types[key], f"{section}.{key}", source))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> "Config":
        """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
        cfg = cls()
        if path is not None:
            try:
                with open(path, encoding="utf-8") as fh:
                    raw = yaml.load(fh, Loader=_UniqueKeyLoader)
            except FileNotFoundError:
                raise InputError(path, "config file not found") from None
            except UnicodeDecodeError:
                raise InputError(path, "not a text (UTF-8) YAML file") from None
            except OSError as exc:
                raise InputError(path, f"cannot read the config file ({exc.strerror or exc})") from None
            except yaml.YAMLError as exc:
                first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
                raise InputError(path, f"not valid YAML ({first})") from None
            try:
                cfg = cfg.override(raw or {}, source=os.fspath(path))
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None
        return cfg.override(overrides or {}, source="command line", unset=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last
    silently, so a second ``data:`` section would drop the first one's settings)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


@functools.cache
def _field_types(section: type) -> dict[str, tuple[type, bool]]:
    """``{key: (type, nullable)}`` of a config section, from its resolved annotations."""
    hints = typing.get_type_hints(section)
    out = {}
    for f in dataclasses.fields(section):
        args = typing.get_args(hints[f.name])
        kinds = [a for a in args if a is not type(None)] or [hints[f.name]]
        out[f.name] = (kinds[0], type(None) in args)
    return out


_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, kind: type, nullable: bool, key: str, source: str) -> Any:
    """Check and convert a YAML/flag value to the field's declared type (None only where allowed)."""
    if value is None and nullable:
        return None
    try:
        if value is None or isinstance(value, bool):
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
            return number
        if kind is str and not isinstance(value, str):
            raise ValueError
    except (TypeError, ValueError):
        expected = _NAMES[kind] + (" or null" if nullable else "")
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}") from None
    return value
