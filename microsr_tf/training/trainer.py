"""Train the CycleGAN, or a supervised baseline (``model.method``), into a run directory: the
library side of ``microsr-tf train``. What differs between methods comes from
:mod:`microsr_tf.training.methods`; the run itself is the same.

Layout of ``RUN_DIR``::

    config.yaml            the resolved configuration of the run
    logs/                  TensorBoard: step and epoch losses, learning rate, image panels
    checkpoints/           full training state (weights, optimizers, step counter, best loss)
    generator.keras        G_L (or the baseline's generator) at the end of training (+
                           generator.meta.json), float32 whatever train.precision was
    generator_best.keras   the generator after the epoch with the lowest mean cycle loss (baselines:
                           pixel loss) (+ .meta.json)

Everything that can be checked is checked before ``RUN_DIR`` is created, and a run that fails
before its first checkpoint removes the directory it created.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf
import yaml

from microsr_tf.config import Config
from microsr_tf.degradation import PairedData
from microsr_tf.errors import ConfigError, InputError, MicrosrError
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.cyclegan import float32_generator
from microsr_tf.pipeline import TrainingData
from microsr_tf.training.callbacks import CheckpointSaver, ProgressBar, TensorBoardLogger, summary_writer
from microsr_tf.training.methods import build_method, is_deterministic, method_data
from microsr_tf.training.multiworker import custom_loop
from microsr_tf.training.strategy import WorkerDir, check_batch_size, is_chief, is_multiworker, make_strategy
from microsr_tf.volumes import make_output_dir

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
GENERATOR_FILE = "generator.keras"
BEST_GENERATOR_FILE = "generator_best.keras"
KEEP_CHECKPOINTS = 3


class TrainingDiverged(MicrosrError):
    """A loss became NaN or infinite; the run stopped at its last good checkpoint."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    generator_path: Path
    best_generator_path: Path | None
    steps: int  # global step reached (optimizer iterations)
    epochs: int
    history: list[dict[str, float]]  # epoch means of this invocation: {"epoch", "step", "<loss>": ...}
    best_cycle_loss: float  # lowest epoch-mean cycle loss (baselines: pixel loss)


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """Prefix of the newest checkpoint in ``run_dir``, or None."""
    return tf.train.latest_checkpoint(os.path.join(os.fspath(run_dir), CHECKPOINT_DIR))


def generator_meta(cfg: Config, data: TrainingData | PairedData) -> dict:
    """Metadata stored beside the generator; the prediction stage reads exactly these keys.

    ``deterministic`` is true when the generator has nothing random (a baseline, or a CycleGAN without
    dropout): its Monte Carlo variance is zero.
    """
    return {
        "format": 1,
        "method": cfg.model.method,
        "deterministic": is_deterministic(cfg.model),
        "hr_spacing": [float(s) for s in data.hr_spacing],
        "lr_spacing": [float(s) for s in data.lr_spacing],
        "factors": [float(f) for f in data.factors],
        "hr_stats": data.hr_stats.to_dict(),
        "lr_stats": None if data.lr_stats is None else data.lr_stats.to_dict(),
        "roi_threshold_lr": cfg.data.roi_threshold_lr,
        "model": dataclasses.asdict(cfg.model),
        "patch_size": cfg.data.patch_size,
        "axis": cfg.data.axis,
    }


def _check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> None:
    """A fresh run needs an absent or empty directory; a resumed one a checkpoint of the same model."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "exists and is not a directory; choose a run directory")
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(run_dir, "is not empty; pass --resume to continue its run or choose a new directory")
        return
    if not run_dir.is_dir() or latest_checkpoint(run_dir) is None:
        raise InputError(run_dir, "has no checkpoint to resume from")
    saved_path = run_dir / CONFIG_FILE
    try:
        with open(saved_path, encoding="utf-8") as fh:
            saved = Config.from_dict(yaml.safe_load(fh) or {}, source=str(saved_path))
    except FileNotFoundError:
        raise InputError(saved_path, "missing; cannot check the resumed run's settings") from None
    for section, key in [("model", f.name) for f in dataclasses.fields(cfg.model)] + [("data", "patch_size")]:
        old, new = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
        if old != new:
            raise ConfigError(f"{saved_path}: {section}.{key} was {old!r} in the checkpointed run, "
                              f"cannot resume with {new!r}")


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restore every object of this run from ``path``; a checkpoint of another setup is an error."""
    try:
        status = checkpoint.restore(path)
    except (tf.errors.OpError, ValueError, IndexError) as exc:  # truncated or foreign checkpoint files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read this checkpoint ({first})") from None
    try:
        status.assert_existing_objects_matched()
    except AssertionError as exc:
        raise ConfigError(f"{path}: does not match this run's model ({str(exc).splitlines()[0]})") from None


def _fit(model: keras.Model, dataset: tf.data.Dataset, epochs: int, steps_per_epoch: int, callbacks: list) -> None:
    """``fit`` from the model's current step; a resumed run first finishes its interrupted epoch."""
    done = int(model.optimizer.iterations.numpy())
    epoch, offset = divmod(done, steps_per_epoch)
    if offset and epoch < epochs:
        model.fit(dataset, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps_per_epoch - offset,
                  callbacks=callbacks, shuffle=False, verbose=0)
        epoch += 1
        if model.stop_training:
            return
    if epoch < epochs:
        model.fit(dataset, epochs=epochs, initial_epoch=epoch, steps_per_epoch=steps_per_epoch,
                  callbacks=callbacks, shuffle=False, verbose=0)


def train(cfg: Config, lr_dir: str | os.PathLike | None, hr_dir: str | os.PathLike | None,
          run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg.model.method`` on the LR and HR folders into ``run_dir`` (see the module doc): the
    CycleGAN's G_L/G_H/D_L/D_H on unpaired patches, or a baseline on degraded HR patches.

    With ``resume`` the run continues from the newest checkpoint in ``run_dir`` with the same step
    counter, optimizer states and learning-rate schedule. Raises :class:`InputError` /
    :class:`ConfigError` for user mistakes and :class:`TrainingDiverged` on a NaN/Inf loss.
    """
    cfg = cfg.validate()
    tc = cfg.train
    run_dir = Path(run_dir)
    strategy = make_strategy(tc.strategy)
    check_batch_size(tc.batch_size, strategy)
    _check_run_dir(cfg, run_dir, resume)
    data = method_data(cfg, lr_dir, hr_dir, n_val=tc.n_val_patches)
    steps_per_epoch = tc.steps_per_epoch or data.steps_per_epoch(tc.batch_size)
    keras.utils.set_random_seed(tc.seed)

    chief = is_chief(strategy)
    created = chief and not run_dir.exists()
    out = WorkerDir(run_dir, chief)
    out_dir = Path(out.path)
    manager = None
    try:
        make_output_dir(out_dir)
        cfg.save(out_dir / CONFIG_FILE)
        with strategy.scope():
            setup = build_method(cfg, steps_per_epoch)
            model = setup.model
            best_cycle = tf.Variable(math.inf, trainable=False, name="best_cycle_loss")
        checkpoint = tf.train.Checkpoint(best_cycle_loss=best_cycle, **setup.checkpoint_objects)
        manager = tf.train.CheckpointManager(checkpoint, str(out_dir / CHECKPOINT_DIR), KEEP_CHECKPOINTS)
        if resume:
            _restore(checkpoint, latest_checkpoint(run_dir))

        meta = generator_meta(cfg, data)
        best_path = run_dir / BEST_GENERATOR_FILE
        saver = CheckpointSaver(manager, tc.checkpoint_every, best_cycle, best_key=setup.best_loss,
                                on_best=(lambda: save_generator(float32_generator(setup.generator), best_path, meta)) if chief else None)
        callbacks: list[keras.callbacks.Callback] = [saver]
        writer = None
        if chief:
            writer = summary_writer(out_dir / LOG_DIR)
            callbacks.append(TensorBoardLogger(writer, tc.log_every, tc.image_every, data.val_lr, data.val_hr,
                                               tc.mc_samples_val, setup.panel, setup.panel_tag))
            if progress:
                callbacks.append(ProgressBar(tc.epochs, setup.shown_losses))

        if is_multiworker(strategy):
            custom_loop(model, strategy, lambda ctx: data.dataset(tc.batch_size, ctx), tc.epochs,
                        steps_per_epoch, callbacks)
        else:
            _fit(model, data.dataset(tc.batch_size), tc.epochs, steps_per_epoch, callbacks)
        if writer is not None:
            writer.close()

        steps = int(model.optimizer.iterations.numpy())
        if saver.diverged is not None:
            step, name = saver.diverged
            last = latest_checkpoint(out_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise TrainingDiverged(f"{run_dir}: training diverged: {name} became NaN/Inf at step {step}; {kept}")
        generator_path = run_dir / GENERATOR_FILE
        if chief:
            save_generator(float32_generator(setup.generator), generator_path, meta)
        return TrainResult(run_dir=run_dir, generator_path=generator_path,
                           best_generator_path=best_path if best_path.exists() else None, steps=steps,
                           epochs=steps // steps_per_epoch, history=saver.history,
                           best_cycle_loss=float(best_cycle.numpy()))
    except BaseException:
        if created and (manager is None or manager.latest_checkpoint is None):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        out.cleanup()
