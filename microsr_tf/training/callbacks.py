"""Keras callbacks of a training run: checkpoints with a NaN guard, TensorBoard summaries with an
image panel, and a progress bar. They work both under ``fit`` and under the multi-worker custom
loop (which drives them through ``keras.callbacks.CallbackList``).

All of them read the global step from the generator optimizer's ``iterations``, so they agree
with each other and survive a resume.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from microsr_tf.models.cyclegan import STEP_PREFIX, CycleGAN
from microsr_tf.training.checkpoints import CheckpointRing


def global_step(model: CycleGAN) -> int:
    return int(model.optimizer.iterations.numpy())


def epoch_means(logs: dict | None) -> dict[str, float]:
    """The epoch-mean losses of a step's logs (without this step's own ``step/`` values)."""
    return {k: float(v) for k, v in (logs or {}).items() if not k.startswith(STEP_PREFIX)}


class EpochMeanState(tf.Module):
    """The loss trackers' running sums as of the last checkpoint, saved with it.

    Keras resets its loss trackers whenever an epoch begins, so a run resumed mid-epoch would average
    only the steps after the resume: its epoch means, and with them the best-epoch pick, would differ from
    the uninterrupted run's. Seeding the trackers from this state when the resumed epoch begins makes
    them continue from the checkpoint's sums (float32 values, held exactly in float64).
    """

    def __init__(self, trackers: list):
        super().__init__(name="epoch_means")
        size = sum(len(t.variables) for t in trackers)
        self.step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="step")
        self.values = tf.Variable(tf.zeros([size], tf.float64), trainable=False, name="values")

    @staticmethod
    def _variables(trackers: list) -> list:
        return [v for t in trackers for v in t.variables]

    def capture(self, trackers: list, step: int) -> None:
        """Record the trackers' state at global step ``step`` (right before a checkpoint is written)."""
        self.values.assign([float(np.asarray(v.numpy())) for v in self._variables(trackers)])
        self.step.assign(step)

    def seed(self, trackers: list, step: int) -> None:
        """Put the recorded state back into the trackers if it was recorded at ``step`` (a checkpoint
        written before epoch means were saved has none: its epoch then restarts them)."""
        if int(self.step.numpy()) == step:
            for variable, value in zip(self._variables(trackers), self.values.numpy()):
                variable.assign(value)


class CheckpointSaver(keras.callbacks.Callback):
    """Saves the full training state every ``every`` steps and at each epoch end; tracks the best
    epoch (lowest epoch mean of ``best_key``, the cycle loss by default) and stops, without saving,
    when a loss turns NaN or infinite.

    ``on_best()`` is called after each new best epoch has been checkpointed (e.g. to export the
    generator). ``diverged`` is ``(step, loss name)`` once a non-finite loss was seen. With
    ``epoch_state`` every checkpoint records the epoch's running means, and a run resumed mid-epoch
    (``resumed_mid_epoch``) continues them when its first epoch begins.
    """

    def __init__(self, ring: CheckpointRing, every: int, best_cycle: tf.Variable,
                 on_best: Callable[[], None] | None = None, best_key: str = "cycle_loss",
                 epoch_state: EpochMeanState | None = None, resumed_mid_epoch: bool = False):
        super().__init__()
        self.epoch_state = epoch_state
        self._reseed = resumed_mid_epoch and epoch_state is not None
        self.ring = ring
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
            if self.epoch_state is not None:
                self.epoch_state.capture(self.model.metrics, step)
            self.ring.save(step)
            self._saved_step = step

    def on_epoch_begin(self, epoch, logs=None):
        if self._reseed:  # Keras has just reset the trackers: continue the interrupted epoch's sums
            self._reseed = False
            self.epoch_state.seed(self.model.metrics, global_step(self.model))

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
    """Progress of the run on stdout, counted in global steps so a resumed run continues its numbers.

    On a terminal: ``Epoch k/N`` and a Keras progress bar per epoch with the epoch-mean losses. When
    stdout is redirected (a log file, a batch scheduler): the same ``Epoch k/N`` lines and one plain
    line every ``every`` steps and at each epoch end -- no ANSI codes, carriage returns or
    backspaces -- with the global step, losses, speed and time left.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, every: int,
                 shown: tuple[str, ...] = ("g_loss", "d_loss", "cycle_loss"), stream=None):
        super().__init__()
        self.epochs, self.steps_per_epoch, self.every = int(epochs), int(steps_per_epoch), int(every)
        self.shown = shown
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = self.stream.isatty()
        self._bar: keras.utils.Progbar | None = None
        self._clock: tuple[float, int] | None = None  # (time, step) when this invocation started stepping

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._say(f"Epoch {epoch + 1}/{self.epochs}")
        if self.terminal:
            self._bar = keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=self.shown)

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if self._clock is None:  # the first step includes tracing: time the rest
            self._clock = (time.monotonic(), step)
        values = [(k, float(v)) for k, v in epoch_means(logs).items() if k in self.shown]
        in_epoch = step - (math.ceil(step / self.steps_per_epoch) - 1) * self.steps_per_epoch
        if self.terminal:
            self._bar.update(in_epoch, values=values)
        elif step % self.every == 0 or in_epoch == self.steps_per_epoch:
            self._say(self._line(step, values))

    def _line(self, step: int, values: list[tuple[str, float]]) -> str:
        total = self.epochs * self.steps_per_epoch
        parts = [f"  step {step}/{total}"] + [f"{k} {v:.4f}" for k, v in values]
        start_time, start_step = self._clock
        elapsed = time.monotonic() - start_time
        if step > start_step and elapsed > 0:
            rate = (step - start_step) / elapsed
            parts += [f"{rate:.3g} steps/s", f"{_duration((total - step) / rate)} left"]
        return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def summary_writer(logdir: str | os.PathLike) -> tf.summary.SummaryWriter:
    return tf.summary.create_file_writer(os.fspath(logdir))
