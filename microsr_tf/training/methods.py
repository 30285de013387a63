"""What differs between ``model.method`` values in a training run: the data the method reads, its
networks and optimizers, what a checkpoint holds, which loss picks the best epoch, and the image
panel. :mod:`microsr_tf.training.trainer` asks for these here and runs every method the same way.

- ``cyclegan`` (the paper): unpaired LR and HR patch streams, G_L/G_H/D_L/D_H; best epoch by the mean
  cycle loss; generator G_L with Monte Carlo dropout.
- ``unet``, ``srgan`` (the paper's supervised baselines): HR patches paired with their synthetic
  degradation (:mod:`microsr_tf.degradation`); best epoch by the mean pixel loss; deterministic
  generators (zero Monte Carlo variance).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from microsr_tf.config import Config, ModelConfig
from microsr_tf.degradation import PairedData, make_paired_data
from microsr_tf.models.cyclegan import build_cyclegan, make_optimizer
from microsr_tf.models.supervised import PIXEL_LOSS, SupervisedSR, build_supervised
from microsr_tf.pipeline import TrainingData, make_training_data
from microsr_tf.training.callbacks import image_panel

SUPERVISED = ("unet", "srgan")

Panel = Callable[[keras.Model, np.ndarray, np.ndarray, int], tf.Tensor]


@dataclass
class MethodSetup:
    """The parts of one method's run that the trainer wires up."""

    model: keras.Model  # compiled; ``optimizer.iterations`` is the global step; has ``train_step``
    generator: keras.Model  # the LR -> HR network saved as generator.keras
    checkpoint_objects: dict[str, object]  # everything a checkpoint holds besides the best loss
    best_loss: str  # epoch-mean loss whose minimum selects generator_best.keras
    shown_losses: tuple[str, ...]  # losses on the progress bar
    panel: Panel  # TensorBoard image panel of the fixed validation patches
    panel_tag: str


def is_deterministic(model_cfg: ModelConfig) -> bool:
    """Whether the method's generator has nothing random, so its Monte Carlo variance is zero."""
    if model_cfg.method in SUPERVISED:
        return True
    return model_cfg.dropout_position == "none" or model_cfg.dropout_rate == 0 or (
        model_cfg.dropout_position == "resblocks" and model_cfg.n_blocks == 0)


def method_data(cfg: Config, lr_dir: str | os.PathLike | None, hr_dir: str | os.PathLike | None,
                n_val: int) -> TrainingData | PairedData:
    """Unpaired LR/HR streams for the CycleGAN; degraded/HR pairs (LR folder read for its spacing
    only) for the supervised baselines."""
    if cfg.model.method in SUPERVISED:
        return make_paired_data(lr_dir, hr_dir, cfg.data, n_val=n_val)
    return make_training_data(lr_dir, hr_dir, cfg.data, n_val=n_val)


def build_method(cfg: Config, steps_per_epoch: int) -> MethodSetup:
    """Networks, compiled optimizers and checkpoint objects of ``cfg.model.method``; call inside the
    strategy scope."""
    tc = cfg.train
    # No whole-step XLA (Keras' "auto" would turn it on for one GPU): it measured no faster on CPU and
    # blew up compile time and memory around the generator's own XLA-fused kernels.
    if cfg.model.method in SUPERVISED:
        model = build_supervised(cfg.model, tc, cfg.data.patch_size)
        adversarial = model.critic is not None
        model.compile(make_optimizer(tc, steps_per_epoch, "g_adam"),
                      make_optimizer(tc, steps_per_epoch, "d_adam") if adversarial else None, jit_compile=False)
        # The networks keep their layers in lists, which TF's checkpoint tracking does not look into
        # (trainable weights would still be reached through the optimizers): listing every variable
        # keeps batch norm's moving statistics in the checkpoint, so a resumed run predicts the same.
        objects = {"generator": list(model.generator.variables), "g_optimizer": model.optimizer}
        if adversarial:
            objects.update(critic=list(model.critic.variables), d_optimizer=model.d_optimizer)
        return MethodSetup(model=model, generator=model.generator, checkpoint_objects=objects, best_loss=PIXEL_LOSS,
                           shown_losses=("g_loss", "d_loss", PIXEL_LOSS), panel=supervised_panel,
                           panel_tag="validation/degraded|output|hr|error")
    model = build_cyclegan(cfg.model, tc, cfg.data.patch_size)
    model.compile(make_optimizer(tc, steps_per_epoch, "g_adam"), make_optimizer(tc, steps_per_epoch, "d_adam"),
                  jit_compile=False)
    pools = {k: p for k, p in (("pool_l", model.pool_l), ("pool_h", model.pool_h)) if p is not None}
    objects = {"g_l": model.g_l, "g_h": model.g_h, "d_l": model.d_l, "d_h": model.d_h,
               "g_optimizer": model.optimizer, "d_optimizer": model.d_optimizer, **pools}
    return MethodSetup(model=model, generator=model.g_l, checkpoint_objects=objects, best_loss="cycle_loss",
                       shown_losses=("g_loss", "d_loss", "cycle_loss"), panel=image_panel,
                       panel_tag="validation/lr|g_l|cycle|hr|variance")


def supervised_panel(model: SupervisedSR, val_lr: np.ndarray, val_hr: np.ndarray, mc_samples: int) -> tf.Tensor:
    """One ``[1, n*p, 4*p, 1]`` image, a row per validation pair: degraded input | output (inference
    mode) | HR target | absolute error (scaled to its maximum). ``mc_samples`` is unused: the output
    is deterministic."""
    x = tf.convert_to_tensor(val_lr, tf.float32)
    hr = tf.convert_to_tensor(val_hr, tf.float32)
    out = tf.cast(model.generator(x, training=False), tf.float32)
    error = tf.abs(out - hr)
    error = tf.math.divide_no_nan(error, tf.reduce_max(error))
    row = tf.concat([tf.clip_by_value(c, 0.0, 1.0) for c in (x, out, hr, error)], axis=2)  # [n, p, 4p, 1]
    return tf.reshape(row, [1, -1, tf.shape(row)[2], 1])
