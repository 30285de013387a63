"""Keras callbacks of a training run: checkpoints with a NaN guard, TensorBoard summaries with an
image panel, and a progress bar. They work both under ``fit`` and under the multi-worker custom
loop (which drives them through ``keras.callbacks.CallbackList``).

All of them read the global step from the generator optimizer's ``iterations``, so they agree
with each other and survive a resume.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from microsr_tf.models.cyclegan import STEP_PREFIX, CycleGAN


def global_step(model: CycleGAN) -> int:
    return int(model.optimizer.iterations.numpy())


def epoch_means(logs: dict | None) -> dict[str, float]:
    """The epoch-mean losses of a step's logs (without this step's own ``step/`` values)."""
    return {k: float(v) for k, v in (logs or {}).items() if not k.startswith(STEP_PREFIX)}


class CheckpointSaver(keras.callbacks.Callback):
    """Saves the full training state every ``every`` steps and at each epoch end; tracks the best
    epoch (lowest epoch mean of ``best_key``, the cycle loss by default) and stops, without saving,
    when a loss turns NaN or infinite.

    ``on_best()`` is called after each new best epoch has been checkpointed (e.g. to export the
    generator). ``diverged`` is ``(step, loss name)`` once a non-finite loss was seen.
    """

    def __init__(self, manager: tf.train.CheckpointManager, every: int, best_cycle: tf.Variable,
                 on_best: Callable[[], None] | None = None, best_key: str = "cycle_loss"):
        super().__init__()
        self.manager = manager
        self.every = int(every)
        self.best_cycle = best_cycle
        self.on_best = on_best
        self.best_key = best_key
        self.diverged: tuple[int, str] | None = None
        self.history: list[dict[str, float]] = []
        self._saved_step = -1

    def _finite(self, logs: dict | None, step: int) -> bool:
        for name, value in (logs or {}).items():
            if not math.isfinite(float(value)):
                self.diverged = (step, name.removeprefix(STEP_PREFIX))
                self.model.stop_training = True
                return False
        return True

    def _save(self, step: int, force: bool = False) -> None:
        if force or step != self._saved_step:
            self.manager.save(checkpoint_number=step)
            self._saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if self.diverged is None and self._finite(logs, step) and step % self.every == 0:
            self._save(step)

    def on_epoch_end(self, epoch, logs=None):
        step = global_step(self.model)
        if self.diverged is not None or not self._finite(logs, step):
            return
        means = epoch_means(logs)
        self.history.append({"epoch": epoch + 1, "step": step, **means})
        improved = means.get(self.best_key, math.inf) < float(self.best_cycle.numpy())
        if improved:
            self.best_cycle.assign(means[self.best_key])
        # A new best changes the state even when this step was just saved by the periodic save:
        # save again, or a resumed run would compare later epochs against a stale best.
        self._save(step, force=improved)
        if improved and self.on_best is not None:
            self.on_best()


def image_panel(model: CycleGAN, val_lr: np.ndarray, val_hr: np.ndarray, mc_samples: int) -> tf.Tensor:
    """One ``[1, n*p, 5*p, 1]`` image, a row per validation patch: LR input | G_L output (MC mean)
    | cycle reconstruction G_H(G_L(x)) | an HR example | MC-dropout variance (scaled to [0, 1])."""
    x = tf.convert_to_tensor(val_lr, tf.float32)
    n = tf.shape(x)[0]
    samples = model.g_l(tf.tile(x, [mc_samples, 1, 1, 1]))
    samples = tf.reshape(samples, tf.concat([[mc_samples, n], tf.shape(samples)[1:]], 0))
    mean = tf.reduce_mean(samples, axis=0)
    variance = tf.math.reduce_variance(samples, axis=0)
    variance = tf.math.divide_no_nan(variance, tf.reduce_max(variance))
    cycle = model.g_h(mean)
    hr = tf.convert_to_tensor(val_hr, tf.float32)
    columns = [x, mean, cycle, hr[: val_lr.shape[0]], variance]
    row = tf.concat([tf.clip_by_value(c, 0.0, 1.0) for c in columns], axis=2)  # [n, p, 5p, 1]
    return tf.reshape(row, [1, -1, tf.shape(row)[2], 1])


class TensorBoardLogger(keras.callbacks.Callback):
    """Scalars every ``log_every`` steps (``step/*``: this step's losses, learning rate), epoch means
    at each epoch end (``epoch/*``), and the validation image panel every ``image_every`` steps
    (``panel(model, val_lr, val_hr, mc_samples)`` under ``panel_tag``; the CycleGAN's by default)."""

    def __init__(self, writer: tf.summary.SummaryWriter, log_every: int, image_every: int,
                 val_lr: np.ndarray, val_hr: np.ndarray, mc_samples: int,
                 panel: Callable[..., tf.Tensor] | None = None,
                 panel_tag: str = "validation/lr|g_l|cycle|hr|variance"):
        super().__init__()
        self.writer = writer
        self.log_every, self.image_every = int(log_every), int(image_every)
        self.val_lr, self.val_hr, self.mc_samples = val_lr, val_hr, int(mc_samples)
        self.panel = panel if panel is not None else image_panel
        self.panel_tag = panel_tag

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        with self.writer.as_default(step=step):
            if step % self.log_every == 0:
                for name, value in (logs or {}).items():
                    if name.startswith(STEP_PREFIX):
                        tf.summary.scalar(name, value)
                tf.summary.scalar("learning_rate", float(tf.convert_to_tensor(self.model.optimizer.learning_rate)))
            if step % self.image_every == 0 and len(self.val_lr):
                tf.summary.image(self.panel_tag, self.panel(self.model, self.val_lr, self.val_hr, self.mc_samples))

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default(step=global_step(self.model)):
            for name, value in epoch_means(logs).items():
                tf.summary.scalar(f"epoch/{name}", value)
            tf.summary.scalar("epoch/epoch", epoch + 1)
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.flush()


class ProgressBar(keras.callbacks.Callback):
    """A Keras progress bar per epoch (with ETA) showing the epoch-mean losses."""

    def __init__(self, epochs: int, shown: tuple[str, ...] = ("g_loss", "d_loss", "cycle_loss")):
        super().__init__()
        self.epochs = int(epochs)
        self.shown = shown
        self._bar: keras.utils.Progbar | None = None

    def on_epoch_begin(self, epoch, logs=None):
        print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)
        self._bar = keras.utils.Progbar(self.params.get("steps"), stateful_metrics=self.shown)

    def on_train_batch_end(self, batch, logs=None):
        values = [(k, v) for k, v in epoch_means(logs).items() if k in self.shown]
        self._bar.update(batch + 1, values=values)


def summary_writer(logdir: str | os.PathLike) -> tf.summary.SummaryWriter:
    return tf.summary.create_file_writer(os.fspath(logdir))
