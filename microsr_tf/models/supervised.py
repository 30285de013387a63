"""Supervised training of the paper's baselines on synthetic ``(degraded, HR)`` pairs: the U-Net with
a pixel loss, and SRGAN with the pixel loss plus an adversarial term (Ledig et al., CVPR 2017).

Losses, per example, with ``sr = G(lr)``:

- pixel (content) loss: ``mean((sr - hr)^2)``, the MSE content loss of Ledig's SRResNet, for both;
- SRGAN generator: ``pixel + w * adv`` with ``adv = -log sigmoid(D(sr))`` (non-saturating log loss;
  ``(D(sr) - 1)^2`` with ``gan_loss="lsgan"``) and ``w = srgan_adv_weight`` (1e-3, Ledig's weight);
- SRGAN critic: ``-log sigmoid(D(hr)) - log(1 - sigmoid(D(sr)))`` (or the least-squares pair).

Ledig's perceptual (VGG feature) content loss needs ImageNet weights, which a run cannot download;
this is the pixel + adversarial variant of the same paper (its "SRGAN-MSE").

As :class:`~microsr_tf.models.cyclegan.CycleGAN`: one fused step (the critic is trained on the fakes
the generator was scored on), losses in float32 whatever the compute precision, and
``tf.nn.compute_average_loss`` over the global batch so a replicated step equals a one-device step.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from microsr_tf.config import ModelConfig, TrainConfig
from microsr_tf.models.cyclegan import dtype_policy, fit_logs
from microsr_tf.models.srgan import SRGANCritic, SRResNetGenerator
from microsr_tf.models.unet import UNetGenerator

PIXEL_LOSS = "pixel_loss"


def _per_example_mean(t: tf.Tensor) -> tf.Tensor:
    """Mean over all axes but the batch, in float32."""
    return tf.reduce_mean(tf.reshape(tf.cast(t, tf.float32), [tf.shape(t)[0], -1]), axis=1)


def adversarial_loss(logits: tf.Tensor, real: bool, gan_loss: str = "bce") -> tf.Tensor:
    """Per-example GAN loss of critic ``logits`` against the all-real or all-fake label."""
    logits = tf.cast(logits, tf.float32)
    target = tf.ones_like(logits) if real else tf.zeros_like(logits)
    if gan_loss == "lsgan":
        return _per_example_mean(tf.square(logits - target))
    return _per_example_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits))


class SupervisedSR(keras.Model):
    """A generator trained on pairs, with an optional critic (SRGAN); ``call(x)`` is the generator.

    ``optimizer`` updates the generator (its ``iterations`` is the global step); with a critic,
    ``d_optimizer`` updates the critic. ``loss_names`` lists what :meth:`step` returns.
    """

    def __init__(self, generator: keras.Model, critic: keras.Model | None, train_cfg: TrainConfig,
                 patch_size: int, **kwargs):
        super().__init__(**kwargs)
        self.generator, self.critic = generator, critic
        self.adv_weight = float(train_cfg.srgan_adv_weight)
        self.gan_loss = train_cfg.gan_loss
        self.patch_size = int(patch_size)
        self.loss_names = (("g_loss", "d_loss", PIXEL_LOSS, "adv_loss") if critic is not None else (PIXEL_LOSS,))
        self.trackers = {n: keras.metrics.Mean(name=n) for n in self.loss_names}
        dummy = tf.zeros((1, self.patch_size, self.patch_size, 1))
        for net in (generator, critic):
            if net is not None:
                net(dummy)
        self.built = True
        self.d_optimizer: keras.optimizers.Optimizer | None = None

    @property
    def metrics(self) -> list:
        """The loss trackers; Keras resets them at the start of every epoch."""
        return list(self.trackers.values())

    def call(self, x):
        return self.generator(x)

    def compile(self, g_optimizer: keras.optimizers.Optimizer,
                d_optimizer: keras.optimizers.Optimizer | None = None, **kwargs) -> None:
        """Attach and build the optimizers (eagerly, as distribution strategies require)."""
        super().compile(optimizer=g_optimizer, **kwargs)
        g_optimizer.build(self.generator.trainable_variables)
        if self.critic is not None:
            if d_optimizer is None:
                raise ValueError("an SRGAN needs a critic optimizer")
            d_optimizer.build(self.critic.trainable_variables)
        self.d_optimizer = d_optimizer

    def generator_losses(self, sr: tf.Tensor, hr: tf.Tensor, fake_logits: tf.Tensor | None) -> dict[str, tf.Tensor]:
        """Per-example generator objective: the pixel MSE, plus ``srgan_adv_weight`` times the
        adversarial loss of the critic's logits on ``sr`` when there is a critic."""
        pixel = _per_example_mean(tf.square(tf.cast(sr, tf.float32) - tf.cast(hr, tf.float32)))
        if fake_logits is None:
            return {PIXEL_LOSS: pixel}
        adv = adversarial_loss(fake_logits, True, self.gan_loss)
        return {"g_loss": pixel + self.adv_weight * adv, PIXEL_LOSS: pixel, "adv_loss": adv}

    def critic_loss(self, real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tf.Tensor:
        """Per-example critic objective: real HR judged real, generated judged fake."""
        return adversarial_loss(real_logits, True, self.gan_loss) + adversarial_loss(fake_logits, False, self.gan_loss)

    def step(self, lr: tf.Tensor, hr: tf.Tensor) -> dict[str, tf.Tensor]:
        """One optimisation step on this replica's batch; returns per-example loss vectors."""
        x, y = tf.convert_to_tensor(lr, tf.float32), tf.convert_to_tensor(hr, tf.float32)
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        global_batch = tf.shape(x)[0] * replicas
        g_vars = self.generator.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            sr = self.generator(x, training=True)
            fake_logits = self.critic(sr, training=True) if self.critic is not None else None
            losses = self.generator_losses(sr, y, fake_logits)
            g_total = losses["g_loss"] if self.critic is not None else losses[PIXEL_LOSS]
            g_scaled = tf.nn.compute_average_loss(g_total, global_batch_size=global_batch)
            if self.critic is not None:
                d_total = self.critic_loss(self.critic(y, training=True), fake_logits)
                d_scaled = tf.nn.compute_average_loss(d_total, global_batch_size=global_batch)
                losses["d_loss"] = d_total
        self.optimizer.apply_gradients(zip(tape.gradient(g_scaled, g_vars), g_vars))
        if self.critic is not None:
            d_vars = self.critic.trainable_variables
            self.d_optimizer.apply_gradients(zip(tape.gradient(d_scaled, d_vars), d_vars))
        del tape
        return losses

    def train_step(self, data):
        """Keras ``fit`` step: :meth:`step`, then epoch means (trackers) and this step's means."""
        lr, hr = data
        losses = self.step(lr, hr)
        return fit_logs(self.trackers, losses)


def build_supervised(model_cfg: ModelConfig, train_cfg: TrainConfig, patch_size: int) -> SupervisedSR:
    """The U-Net or SRGAN of ``model_cfg.method`` in ``train_cfg.precision``; call inside the strategy
    scope (and then ``compile``)."""
    policy = "mixed_bfloat16" if train_cfg.precision == "mixed_bfloat16" else "float32"
    with dtype_policy(policy):
        if model_cfg.method == "unet":
            generator, critic = UNetGenerator(model_cfg.ngf, name="unet"), None
        elif model_cfg.method == "srgan":
            generator = SRResNetGenerator(model_cfg.ngf, model_cfg.n_blocks, name="srresnet")
            critic = SRGANCritic(model_cfg.ndf, name="srgan_critic")
        else:
            raise ValueError(f"not a supervised method: {model_cfg.method!r}")
    return SupervisedSR(generator, critic, train_cfg, patch_size, name=model_cfg.method)
