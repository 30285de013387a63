"""The CycleGAN of the paper (section 2): generators G_L (LR -> HR) and G_H (HR -> LR), PatchGAN
critics D_L (judges LR-domain images) and D_H (judges HR-domain images), one fused training step.

The step runs every generator and critic forward pass once and derives both updates from it: the
critics are trained on the same fakes (and, without an image pool, the same critic logits) the
generators were scored on. This matches the alternating CycleGAN update exactly, because the
generator update does not touch the critics and the critics are trained on fakes made before the
generator update.

With ``TrainConfig.precision = "mixed_bfloat16"`` the four networks follow Keras' ``mixed_bfloat16``
policy (float32 variables, bfloat16 convolutions); their outputs are cast to float32 before every
loss, and bfloat16's float32 exponent range needs no loss scaling.

Losses are reduced per example and then scaled with ``tf.nn.compute_average_loss`` over the
*global* batch; Keras optimizers sum gradients over replicas, so a step under a distribution
strategy makes the same update as one device on the whole batch.

Randomness (dropout masks, image-pool draws) is a pure function of the run's seed, the step counter
and the example's place in the global batch (:func:`step_seed_rows`). Nothing depends on a random
state carried from step to step, so a run restored from a checkpoint (which holds the step counter)
draws exactly what it would have drawn without the interruption, on any number of replicas.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from microsr_tf.config import ModelConfig, TrainConfig
from microsr_tf.models.discriminator import PatchDiscriminator
from microsr_tf.models.generator import ResnetGenerator
from microsr_tf.preprocessing import area_matrix

LOSS_NAMES = ("g_loss", "d_loss", "cycle_loss", "adv_loss", "d_l_loss", "d_h_loss", "identity_loss",
              "lr_consistency_loss", "periodic_loss")
STEP_PREFIX = "step/"  # train_step also returns this step's losses under "step/<name>"


@keras.saving.register_keras_serializable(package="microsr_tf")
class LinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Constant ``initial`` until step ``decay_start``, then linear to 0 at ``total_steps``.

    A function of the optimizer's step counter only, so restoring the optimizer restores the rate.
    """

    def __init__(self, initial: float, decay_start: int, total_steps: int):
        self.initial = float(initial)
        self.decay_start = int(decay_start)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        span = float(max(self.total_steps - self.decay_start, 1))
        fraction = tf.clip_by_value((step - self.decay_start) / span, 0.0, 1.0)
        return self.initial * (1.0 - fraction)

    def get_config(self):
        return {"initial": self.initial, "decay_start": self.decay_start, "total_steps": self.total_steps}


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int, name: str) -> keras.optimizers.Adam:
    """Adam(lr, beta_1) as the paper, with CycleGAN's linear decay when ``decay_start_epoch`` is set."""
    rate = cfg.learning_rate
    if cfg.decay_start_epoch is not None:
        rate = LinearDecay(rate, cfg.decay_start_epoch * steps_per_epoch, cfg.epochs * steps_per_epoch)
    return keras.optimizers.Adam(learning_rate=rate, beta_1=cfg.beta_1, name=name)


N_GENERATOR_PASSES = 6  # dropout seed rows per step: G_L(x), G_H(y), the two cycle passes, two identity passes


def step_seed_rows(seed: int, step: tf.Tensor, count: int, global_batch: tf.Tensor, first: tf.Tensor,
                   batch: tf.Tensor) -> tf.Tensor:
    """``[count, batch, 2]`` int32 dropout seed rows for global-batch examples ``first .. first + batch``
    at training step ``step``.

    The rows of the whole global batch are drawn statelessly from ``(seed, step)`` and each replica
    takes its own slice, so they depend neither on the number of replicas nor on earlier steps.
    """
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    rows = tf.random.stateless_uniform(tf.stack([count, global_batch, 2]), seed=key, minval=None, maxval=None,
                                       dtype=tf.int32)
    return rows[:, first:first + batch]


class ImagePool(tf.Module):
    """History of generated images for a critic (CycleGAN's pool; Shrivastava et al. 2017).

    While filling, fakes go in and come back unchanged; once full, each fake is swapped for a random
    stored one (which it replaces) where its ``coin`` is below 1/2, else passed through. The buffer lives
    in ON_READ variables: under a distribution strategy every replica keeps and updates its own
    history inside the compiled step, with no cross-replica traffic. Checkpoints keep the first
    replica's history.
    """

    def __init__(self, size: int, image_shape: tuple[int, int, int], name: str | None = None):
        super().__init__(name=name)
        self.size = int(size)
        local = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # One spare slot at index `size` absorbs the writes of fakes that are not kept, so every
        # shape stays static (XLA-compatible).
        self.images = tf.Variable(tf.zeros((self.size + 1, *image_shape)), name="images", **local)
        self.count = tf.Variable(0, dtype=tf.int32, name="count", **local)

    def query(self, fakes: tf.Tensor, coin: tf.Tensor, pick: tf.Tensor) -> tf.Tensor:
        """Images to show the critic in place of ``fakes`` (same shape); updates the pool.

        ``coin`` (``[B]`` uniform in [0, 1)) and ``pick`` (``[B]`` ints in [0, size)) are the random
        draws: swap where ``coin < 0.5``, with stored image ``pick``.
        """
        batch = tf.shape(fakes)[0]
        filled = tf.identity(self.count)
        buffer = tf.identity(self.images)
        position = filled + tf.range(batch)
        filling = position < self.size
        # swap only once the pool was full before this batch, so a swap never reads an empty slot
        swap = tf.logical_and(filled >= self.size, coin < 0.5)
        out = tf.where(swap[:, None, None, None], tf.gather(buffer, pick), fakes)
        target = tf.where(filling, position, tf.where(swap, pick, self.size))
        self.images.assign(tf.tensor_scatter_nd_update(buffer, target[:, None], fakes))
        self.count.assign(tf.minimum(filled + batch, self.size))
        return out


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Layers constructed inside take Keras dtype policy ``name``; the global policy is restored after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def float32_generator(generator: ResnetGenerator) -> ResnetGenerator:
    """``generator`` if it computes in float32, else a float32 copy with its weights (for saving: the
    prediction stage loads a float32 model whatever precision it was trained in)."""
    if generator.compute_dtype == "float32":
        return generator
    with dtype_policy("float32"):
        copy = type(generator).from_config({**generator.get_config(), "dtype": "float32"})
    copy.build((None, None, None, 1))
    copy.set_weights(generator.get_weights())
    copy.xla_kernels = generator.xla_kernels
    return copy


def _per_example_mean(t: tf.Tensor) -> tf.Tensor:
    """Mean over all axes but the batch: one value per example (in float32)."""
    return tf.reduce_mean(tf.reshape(tf.cast(t, tf.float32), [tf.shape(t)[0], -1]), axis=1)


def _float32(t: tf.Tensor) -> tf.Tensor:
    """``t`` as float32: losses are computed in float32 whatever the networks' compute dtype."""
    return tf.cast(t, tf.float32)


def area_operators(patch: int, factors: Sequence[float]) -> tuple[tf.Tensor, tf.Tensor]:
    """Dense row and column averaging matrices taking a ``patch``-pixel square onto the LR grid ``factors``
    coarser (:func:`microsr_tf.preprocessing.area_matrix`: each LR voxel averages its exact footprint)."""
    ops = []
    for f in factors:
        n = max(1, int(round(patch / float(f))))
        ops.append(tf.constant(area_matrix(n, patch, float(f)).toarray(), tf.float32))
    return ops[0], ops[1]


def lr_inconsistency(a: tf.Tensor, b: tf.Tensor, area: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
    """Per example, ``1 - corr(down(a), down(b))``: ``down`` averages each LR voxel's footprint on the HR
    grid (the ``area`` operators of :func:`area_operators`), and the Pearson correlation ignores any gain
    and offset between the two domains' intensities. 0 when ``a`` has ``b``'s coarse structure, up to 2."""
    rows, cols = area
    down_a = tf.einsum("ij,bjkc,lk->bilc", rows, _float32(a), cols)
    down_b = tf.einsum("ij,bjkc,lk->bilc", rows, _float32(b), cols)
    da = down_a - tf.reduce_mean(down_a, axis=[1, 2, 3], keepdims=True)
    db = down_b - tf.reduce_mean(down_b, axis=[1, 2, 3], keepdims=True)
    cov = tf.reduce_sum(da * db, axis=[1, 2, 3])
    norm = tf.sqrt(tf.reduce_sum(da * da, axis=[1, 2, 3]) * tf.reduce_sum(db * db, axis=[1, 2, 3]) + 1e-12)
    return 1.0 - cov / norm


def lattice_basis(patch: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Hann-windowed cosine and sine planes ``[patch, patch, 15]`` of the 15 non-zero frequencies of the
    1/4-cycle-per-pixel lattice (the 2 and 4 px periods an x2 upsampling imprints), divided by the
    window's sum. ``patch`` must be a multiple of 4, so that they are exact DFT frequencies; the window
    is the periodic Hann, whose leakage reaches one bin only, so smooth content adds nothing at the
    lattice (at 1/4 cycle per pixel, four bins from the origin even in a 16-pixel patch)."""
    if patch % 4:
        raise ValueError(f"the periodic loss needs a patch side divisible by 4, got {patch}")
    freqs = [(ky, kx) for ky in range(4) for kx in range(4) if (ky, kx) != (0, 0)]
    r = np.arange(patch, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * r / patch)
    window = np.outer(hann, hann)
    phase = np.stack([2.0 * np.pi * (ky * r[:, None] + kx * r[None, :]) / 4.0 for ky, kx in freqs], axis=-1)
    scale = window[..., None] / window.sum()
    return tf.constant(np.cos(phase) * scale, tf.float32), tf.constant(np.sin(phase) * scale, tf.float32)


def lattice_amplitude(u: tf.Tensor, basis: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
    """Per example, the summed amplitude of ``u``'s windowed Fourier coefficients at the 15 lattice
    frequencies of :func:`lattice_basis`: about 0 for natural content, ``a / 2`` per frequency for an
    imprinted cosine pattern of amplitude ``a``."""
    cos, sin = basis
    u = _float32(u)[..., 0]
    re = tf.einsum("byx,yxk->bk", u, cos)
    im = tf.einsum("byx,yxk->bk", u, sin)
    return tf.reduce_sum(tf.sqrt(re * re + im * im + 1e-16), axis=1)


class CycleGAN(keras.Model):
    """G_L, G_H, D_L, D_H and their fused training step; ``call(x)`` translates LR to HR with G_L.

    Objective (paper eq. 1-3): ``lambda_rec * L_rec + lambda_adv * L_adv`` with the standard cycle
    loss ``L_rec = |x - G_H(G_L(x))|_1 + |y - G_L(G_H(y))|_1``. Eq. 1 as printed multiplies the
    second term by ``D_L(G_H(y))``; that factor reads as a typo (it would let the generator lower the
    cycle loss by fooling a critic) and is left out. Generators minimise the non-saturating log loss
    ``-log D_H(G_L(x)) - log D_L(G_H(y))`` (or least squares with ``gan_loss="lsgan"``); each critic
    minimises half its real/fake loss, as CycleGAN, which slows critics relative to generators.
    Optional identity loss ``lambda_rec * lambda_identity * (|G_L(y) - y| + |G_H(x) - x|)``.
    Optional LR-consistency loss, beyond the paper (``lambda_lr_consistency``): brought back to the LR
    grid (``factors`` coarser), G_L(x) must keep x's structure and G_H(y) y's, measured by
    :func:`lr_inconsistency` -- super-resolution should sharpen what the scan shows, not move or invent
    anatomy. Optional periodic loss, beyond the paper (``lambda_periodic``): :func:`lattice_amplitude`
    of G_L(x), each Monte Carlo sample's power at the periods the two x2 upsamplings imprint.
    """

    def __init__(self, g_l: keras.Model, g_h: keras.Model, d_l: keras.Model, d_h: keras.Model,
                 train_cfg: TrainConfig, patch_size: int, factors: tuple[float, float] = (1.0, 1.0),
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.g_l, self.g_h, self.d_l, self.d_h = g_l, g_h, d_l, d_h
        self.seed = int(seed)  # with the step counter, the source of every random draw of a step
        self.lambda_rec = float(train_cfg.lambda_rec)
        self.lambda_adv = float(train_cfg.lambda_adv)
        self.lambda_identity = float(train_cfg.lambda_identity)
        self.lambda_lr_consistency = float(train_cfg.lambda_lr_consistency)
        self.lambda_periodic = float(train_cfg.lambda_periodic)
        self.lr_area = area_operators(patch_size, factors)
        self.lattice = lattice_basis(int(patch_size)) if self.lambda_periodic > 0 else None
        self.gan_loss = train_cfg.gan_loss
        self.patch_size = int(patch_size)
        shape = (self.patch_size, self.patch_size, 1)
        pools = train_cfg.pool_size > 0
        self.pool_l = ImagePool(train_cfg.pool_size, shape, name="pool_l") if pools else None
        self.pool_h = ImagePool(train_cfg.pool_size, shape, name="pool_h") if pools else None
        optional = {"identity_loss": self.lambda_identity, "lr_consistency_loss": self.lambda_lr_consistency,
                    "periodic_loss": self.lambda_periodic}
        names = [n for n in LOSS_NAMES if optional.get(n, 1.0) > 0]
        self.trackers = {n: keras.metrics.Mean(name=n) for n in names}
        dummy = tf.zeros((1, *shape))
        for net in (g_l, g_h, d_l, d_h):
            net(dummy)
        self.built = True
        self.d_optimizer: keras.optimizers.Optimizer | None = None

    @property
    def generator_variables(self) -> list:
        return self.g_l.trainable_variables + self.g_h.trainable_variables

    @property
    def critic_variables(self) -> list:
        return self.d_l.trainable_variables + self.d_h.trainable_variables

    @property
    def metrics(self) -> list:
        """The loss trackers; Keras resets them at the start of every epoch."""
        return list(self.trackers.values())

    def call(self, x):
        return self.g_l(x)

    def compile(self, g_optimizer: keras.optimizers.Optimizer, d_optimizer: keras.optimizers.Optimizer,
                **kwargs) -> None:
        """Attach and build both optimizers; call inside the strategy scope the model was built in.

        Optimizers are built eagerly over their own variables: a lazily built optimizer would create
        its slots inside the replicated step, which distribution strategies refuse.
        """
        super().compile(optimizer=g_optimizer, **kwargs)
        g_optimizer.build(self.generator_variables)
        d_optimizer.build(self.critic_variables)
        self.d_optimizer = d_optimizer

    def _adversarial(self, logits: tf.Tensor, real: bool) -> tf.Tensor:
        """Per-example GAN loss of critic logits against the all-real or all-fake label."""
        logits = _float32(logits)
        target = tf.ones_like(logits) if real else tf.zeros_like(logits)
        if self.gan_loss == "lsgan":
            return _per_example_mean(tf.square(logits - target))
        return _per_example_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits))

    def step(self, lr: tf.Tensor, hr: tf.Tensor) -> dict[str, tf.Tensor]:
        """One optimisation step on this replica's batch; returns per-example loss vectors.

        Works in any replica context (``fit``, ``strategy.run`` in a custom loop, or no strategy).
        """
        x, y = tf.convert_to_tensor(lr, tf.float32), tf.convert_to_tensor(hr, tf.float32)
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0
        batch = tf.shape(x)[0]
        global_batch = batch * replicas
        first = tf.cast(replica, tf.int32) * batch  # this replica's examples in the global batch
        step = self.optimizer.iterations  # read before this step's update increments it
        rows = step_seed_rows(self.seed, step, N_GENERATOR_PASSES, global_batch, first, batch)

        # One persistent tape, two gradient calls (generators, critics). Without a pool the critics'
        # logits on the fakes serve both losses; the critic gradient never reaches the generators.
        with tf.GradientTape(persistent=True) as tape:
            fake_hr = _float32(self.g_l(x, seed=rows[0]))
            fake_lr = _float32(self.g_h(y, seed=rows[1]))
            cycle = (_per_example_mean(tf.abs(x - _float32(self.g_h(fake_hr, seed=rows[2]))))
                     + _per_example_mean(tf.abs(y - _float32(self.g_l(fake_lr, seed=rows[3])))))
            judged_hr, judged_lr = self.d_h(fake_hr), self.d_l(fake_lr)
            adv = self._adversarial(judged_hr, True) + self._adversarial(judged_lr, True)
            g_total = self.lambda_adv * adv + self.lambda_rec * cycle
            losses = {"cycle_loss": cycle, "adv_loss": adv}
            if self.lambda_identity > 0:
                identity = (_per_example_mean(tf.abs(_float32(self.g_l(y, seed=rows[4])) - y))
                            + _per_example_mean(tf.abs(_float32(self.g_h(x, seed=rows[5])) - x)))
                g_total += self.lambda_rec * self.lambda_identity * identity
                losses["identity_loss"] = identity
            if self.lambda_lr_consistency > 0:
                lrc = lr_inconsistency(fake_hr, x, self.lr_area) + lr_inconsistency(fake_lr, y, self.lr_area)
                g_total += self.lambda_lr_consistency * lrc
                losses["lr_consistency_loss"] = lrc
            if self.lambda_periodic > 0:
                periodic = lattice_amplitude(fake_hr, self.lattice)
                g_total += self.lambda_periodic * periodic
                losses["periodic_loss"] = periodic
            g_scaled = tf.nn.compute_average_loss(g_total, global_batch_size=global_batch)

            if self.pool_h is not None:
                coins, picks = self._pool_draws(step, global_batch, first, batch)
                judged_hr = self.d_h(self.pool_h.query(tf.stop_gradient(fake_hr), coins[0], picks[0]))
                judged_lr = self.d_l(self.pool_l.query(tf.stop_gradient(fake_lr), coins[1], picks[1]))
            d_h = 0.5 * (self._adversarial(self.d_h(y), True) + self._adversarial(judged_hr, False))
            d_l = 0.5 * (self._adversarial(self.d_l(x), True) + self._adversarial(judged_lr, False))
            d_total = d_h + d_l
            d_scaled = tf.nn.compute_average_loss(d_total, global_batch_size=global_batch)

        g_vars, d_vars = self.generator_variables, self.critic_variables
        g_grads, d_grads = tape.gradient(g_scaled, g_vars), tape.gradient(d_scaled, d_vars)
        del tape
        self.optimizer.apply_gradients(zip(g_grads, g_vars))
        self.d_optimizer.apply_gradients(zip(d_grads, d_vars))
        return {"g_loss": g_total, "d_loss": d_total, "d_l_loss": d_l, "d_h_loss": d_h, **losses}

    def _pool_draws(self, step, global_batch, first, batch) -> tuple[tf.Tensor, tf.Tensor]:
        """``[2, batch]`` swap coins and stored-image picks for the two pools, drawn like the seed rows."""
        key = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)]), 1)
        shape = tf.stack([2, global_batch])
        coins = tf.random.stateless_uniform(shape, seed=key)
        picks = tf.random.stateless_uniform(shape, seed=tf.random.experimental.stateless_fold_in(key, 1),
                                            minval=0, maxval=self.pool_h.size, dtype=tf.int32)
        return coins[:, first:first + batch], picks[:, first:first + batch]

    def train_step(self, data):
        """Keras ``fit`` step: :meth:`step`, then epoch means (trackers) and this step's means."""
        lr, hr = data
        losses = self.step(lr, hr)
        return fit_logs(self.trackers, losses)


def fit_logs(trackers: dict, losses: dict) -> dict:
    """What a ``train_step`` returns to ``fit``: each tracked loss's epoch mean so far under its name (the
    trackers updated with this step's per-example losses), and this step's mean under ``step/<name>``."""
    logs = {}
    for name, tracker in trackers.items():
        tracker.update_state(losses[name])
        logs[name] = tracker.result()
        logs[STEP_PREFIX + name] = tf.reduce_mean(losses[name])
    return logs


def build_cyclegan(model_cfg: ModelConfig, train_cfg: TrainConfig, patch_size: int,
                   factors: tuple[float, float] = (1.0, 1.0), seed: int | None = None) -> CycleGAN:
    """Networks from ``model_cfg`` in ``train_cfg.precision``; call inside the strategy scope (and then
    ``compile``). ``seed`` drives the step's random draws (default ``train_cfg.seed``, else 0)."""

    def generator(name: str) -> keras.Model:
        return ResnetGenerator(model_cfg.ngf, model_cfg.n_blocks, model_cfg.upsample, model_cfg.dropout_rate,
                               model_cfg.dropout_position, model_cfg.decoder_norm, model_cfg.decoder_blur, name=name)

    def critic(name: str) -> keras.Model:
        return PatchDiscriminator(model_cfg.ndf, model_cfg.n_layers_d, name=name)

    policy = "mixed_bfloat16" if train_cfg.precision == "mixed_bfloat16" else "float32"
    with dtype_policy(policy):
        nets = generator("g_l"), generator("g_h"), critic("d_l"), critic("d_h")
    seed = train_cfg.seed if seed is None else seed
    return CycleGAN(*nets, train_cfg, patch_size, factors, seed=seed or 0, name="cyclegan")
