"""Training throughput: the fused CycleGAN step vs a straightforward keras-io-style step.

Both train the same networks (ResnetGenerator x2, PatchDiscriminator x2) on the same batches. The
baseline follows the keras.io CycleGAN example: a ``tf.function`` with a persistent tape, one
gradient call and one Adam optimizer per network; it is run with our objective (the speed-up
reference) and as published, with its always-on identity terms (two more generator passes), and with
the generator built from stock Keras layers as the example builds it (``stock_generator``).
Ours (``CycleGAN.train_step`` through ``fit``) takes two gradient calls (generators, critics),
reuses the fakes and the critics' logits on them, skips identity passes when their weight is 0,
and runs with or without XLA (``jit_compile``), and in float32 or ``mixed_bfloat16``
(``TrainConfig.precision``: bfloat16 convolutions, float32 weights and losses).

Variants are interleaved over several rounds and the median is reported, so a busy machine
skews them alike. When PyTorch is installed (a CPU build; not a dependency of the package), a PyTorch
step with the same networks and objective (``torch_reference.py``) runs beside them. Run:
``python benchmarks/bench_train.py [--patch 64 --ngf 16 ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from microsr_tf.config import ModelConfig, TrainConfig  # noqa: E402
from microsr_tf.models.cyclegan import build_cyclegan, make_optimizer  # noqa: E402
from microsr_tf.models.discriminator import PatchDiscriminator  # noqa: E402
from microsr_tf.models.generator import ResnetGenerator  # noqa: E402
import machine  # noqa: E402  (benchmarks/machine.py, beside this script)


def stock_generator(ngf: int, n_blocks: int, dropout_rate: float) -> keras.Model:
    """The same ResNet generator built from stock Keras layers, as the keras.io example builds it:
    ``GroupNormalization(groups=-1)`` for instance normalisation, Keras' transposed convolution and
    dropout (bottleneck, always on), a plain 7x7 convolution into one channel."""

    def pad(x, p):
        return keras.layers.Lambda(lambda t: tf.pad(t, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT"))(x)

    def norm_relu(x, relu=True):
        x = keras.layers.GroupNormalization(groups=-1, epsilon=1e-5)(x)
        return keras.layers.ReLU()(x) if relu else x

    inputs = keras.Input((None, None, 1))
    x = norm_relu(keras.layers.Conv2D(ngf, 7)(pad(inputs, 3)))
    for mult in (2, 4):
        x = norm_relu(keras.layers.Conv2D(mult * ngf, 3, strides=2, padding="same")(x))
    for _ in range(n_blocks):
        h = norm_relu(keras.layers.Conv2D(4 * ngf, 3)(pad(x, 1)))
        x = keras.layers.Add()([x, norm_relu(keras.layers.Conv2D(4 * ngf, 3)(pad(h, 1)), relu=False)])
    x = keras.layers.Dropout(dropout_rate)(x, training=True)
    for mult in (2, 1):
        x = norm_relu(keras.layers.Conv2DTranspose(mult * ngf, 3, strides=2, padding="same")(x))
    outputs = keras.layers.Activation("sigmoid")(keras.layers.Conv2D(1, 7)(pad(x, 3)))
    return keras.Model(inputs, outputs)


class KerasIoStyleStep:
    """The keras.io CycleGAN step: four networks, four Adam optimizers, four gradient calls; with this
    package's generator, or with ``stock_layers`` the same generator built from stock Keras layers."""

    def __init__(self, mc: ModelConfig, tc: TrainConfig, patch: int, identity: bool = False,
                 stock_layers: bool = False):
        def gen():
            if stock_layers:
                return stock_generator(mc.ngf, mc.n_blocks, mc.dropout_rate)
            return ResnetGenerator(mc.ngf, mc.n_blocks, mc.upsample, mc.dropout_rate, mc.dropout_position)

        self.gen_g, self.gen_f = gen(), gen()
        self.disc_x, self.disc_y = PatchDiscriminator(mc.ndf, mc.n_layers_d), PatchDiscriminator(mc.ndf, mc.n_layers_d)
        dummy = tf.zeros((1, patch, patch, 1))
        self.nets = [self.gen_g, self.gen_f, self.disc_x, self.disc_y]
        for net in self.nets:
            net(dummy)
        self.opts = [keras.optimizers.Adam(tc.learning_rate, beta_1=tc.beta_1) for _ in self.nets]
        self.lambda_rec, self.lambda_adv = tc.lambda_rec, tc.lambda_adv
        self.identity = identity  # keras.io's example always adds identity terms (0.5 * lambda)
        self.bce = keras.losses.BinaryCrossentropy(from_logits=True)
        self.step = tf.function(self._step)

    def _step(self, real_x, real_y):
        with tf.GradientTape(persistent=True) as tape:
            fake_y = self.gen_g(real_x)
            cycled_x = self.gen_f(fake_y)
            fake_x = self.gen_f(real_y)
            cycled_y = self.gen_g(fake_x)
            disc_real_x, disc_fake_x = self.disc_x(real_x), self.disc_x(fake_x)
            disc_real_y, disc_fake_y = self.disc_y(real_y), self.disc_y(fake_y)
            cycle = tf.reduce_mean(tf.abs(real_x - cycled_x)) + tf.reduce_mean(tf.abs(real_y - cycled_y))
            adv = (self.bce(tf.ones_like(disc_fake_y), disc_fake_y)
                   + self.bce(tf.ones_like(disc_fake_x), disc_fake_x))
            gen_loss = self.lambda_adv * adv + self.lambda_rec * cycle
            if self.identity:
                same_x, same_y = self.gen_f(real_x), self.gen_g(real_y)
                gen_loss += 0.5 * self.lambda_rec * (tf.reduce_mean(tf.abs(real_y - same_y))
                                                     + tf.reduce_mean(tf.abs(real_x - same_x)))
            disc_x_loss = 0.5 * (self.bce(tf.ones_like(disc_real_x), disc_real_x)
                                 + self.bce(tf.zeros_like(disc_fake_x), disc_fake_x))
            disc_y_loss = 0.5 * (self.bce(tf.ones_like(disc_real_y), disc_real_y)
                                 + self.bce(tf.zeros_like(disc_fake_y), disc_fake_y))
        losses = [gen_loss, gen_loss, disc_x_loss, disc_y_loss]
        for net, opt, loss in zip(self.nets, self.opts, losses):
            grads = tape.gradient(loss, net.trainable_variables)
            opt.apply_gradients(zip(grads, net.trainable_variables))
        return gen_loss


def _batches(patch: int, batch: int, n: int = 64) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((n, patch, patch, 1), dtype=np.float32)
    y = rng.random((n, patch, patch, 1), dtype=np.float32)
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch, drop_remainder=True).prefetch(4)


def _time_baseline(step: KerasIoStyleStep, iterator, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = step.step(*next(iterator))
    float(loss)
    return time.perf_counter() - start


def _time_fit_step(model, iterator, steps: int) -> float:
    """Time the exact function ``fit`` runs per step, on a long-lived iterator like the baseline's."""
    start = time.perf_counter()
    for _ in range(steps):
        logs = model.train_function(iterator)
    float(logs["g_loss"])
    return time.perf_counter() - start


def _torch_runner(args, mc: ModelConfig, tc: TrainConfig) -> dict:
    """The PyTorch reference step (``torch_reference.py``) on the same batches, if torch is installed."""
    try:
        import torch

        from torch_reference import TorchCycleGANStep
    except ImportError:
        return {}
    step = TorchCycleGANStep(mc.ngf, mc.n_blocks, mc.ndf, mc.n_layers_d, tc.lambda_rec, tc.lambda_adv,
                             tc.learning_rate, tc.beta_1, threads=os.cpu_count())
    rng = np.random.default_rng(0)
    batches = [tuple(torch.from_numpy(rng.random((args.batch, 1, args.patch, args.patch), dtype=np.float32))
                     for _ in range(2)) for _ in range(8)]

    def run(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            step.step(*batches[i % len(batches)])
        return time.perf_counter() - start

    return {f"PyTorch {torch.__version__} reference step (same networks, G then D)": run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--n-blocks", type=int, default=3)
    ap.add_argument("--ndf", type=int, default=16)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-xla", action="store_true", help="skip the jit_compile variant")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference step (when torch is installed)")
    args = ap.parse_args()

    mc = ModelConfig(ngf=args.ngf, n_blocks=args.n_blocks, ndf=args.ndf)
    tc = TrainConfig(batch_size=args.batch)
    keras.utils.set_random_seed(0)
    dataset = _batches(args.patch, args.batch)

    runners = {}
    for identity, stock in ((False, False), (True, False), (False, True)):
        baseline = KerasIoStyleStep(mc, tc, args.patch, identity, stock)
        name = ("keras-io as published (+ identity terms)" if identity
                else "keras-io style, stock Keras layers" if stock
                else "keras-io style, same objective (4 gradients/optimizers)")
        runners[name] = lambda n, b=baseline, it=iter(dataset): _time_baseline(b, it, n)
    variants = [(False, "float32")] + ([] if args.no_xla else [(True, "float32")]) + [(False, "mixed_bfloat16")]
    for jit, precision in variants:
        tcp = dataclasses.replace(tc, precision=precision)
        model = build_cyclegan(mc, tcp, args.patch)
        model.compile(make_optimizer(tcp, 1000, "g"), make_optimizer(tcp, 1000, "d"), jit_compile=jit)
        model.make_train_function()
        name = ("fused train_step, mixed_bfloat16" if precision != "float32"
                else f"fused train_step (fit's train_function){' + XLA' if jit else ''}")
        runners[name] = lambda n, m=model, it=iter(dataset): _time_fit_step(m, it, n)

    if not args.no_torch:
        runners.update(_torch_runner(args, mc, tc))

    compile_s = {}
    for name, run in runners.items():  # trace / compile, then one untimed warm-up round
        start = time.perf_counter()
        run(2)
        compile_s[name] = time.perf_counter() - start
        run(3)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            rates[name].append(args.steps * args.batch / run(args.steps))

    base = statistics.median(rates[next(iter(rates))])
    print(f"\nmachine: {machine.describe()}; Keras {keras.__version__}; devices: "
          f"{', '.join(d.name for d in tf.config.list_logical_devices())}")
    print(f"config: patch {args.patch}, batch {args.batch}, ngf {args.ngf}, n_blocks {args.n_blocks}, "
          f"ndf {args.ndf}, dropout {mc.dropout_rate} ({mc.dropout_position}); {args.rounds} rounds x "
          f"{args.steps} steps, median\n")
    print("| step | first 2 steps (s) | patches/s (median) | all rounds | speed-up |")
    print("|---|---:|---:|---|---:|")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {compile_s[name]:.1f} | {med:.1f} | {', '.join(f'{v:.1f}' for v in values)} "
              f"| {med / base:.2f}x |")


if __name__ == "__main__":
    main()
