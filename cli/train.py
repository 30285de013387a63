"""``microsr-tf train``: train the CycleGAN on unpaired LR and HR NIfTI folders (or a supervised
U-Net/SRGAN baseline on degraded HR patches) into a run directory."""

from __future__ import annotations

import os

import click

from microsr_tf.config import (DECODER_BLURS, DECODER_NORMS, DROPOUT_POSITIONS, GAN_LOSSES, METHODS, PRECISIONS, STRATEGIES,
                               UPSAMPLE_KINDS, Config)

from ._common import option_values, plural, user_errors

# (flag, config section, key, click type, help, what a None default means); the help ends with the
# config's own default, so the two cannot drift apart
_FLAGS = [
    ("--method", "model", "method", click.Choice(METHODS),
     "cyclegan: the paper's unpaired CycleGAN with MC dropout; unet, srgan: the paper's supervised baselines, "
     "trained on HR patches degraded to the LR voxel size (the LR folder gives the spacing only).", None),
    ("--degradation-noise", "data", "degradation_noise", float,
     "unet/srgan: std of the Gaussian noise added on the LR grid, normalised units.", None),
    ("--srgan-adv-weight", "train", "srgan_adv_weight", float, "srgan: adversarial weight next to the pixel MSE.",
     None),
    ("--epochs", "train", "epochs", int, "Epochs to train (total, counting resumed ones).", None),
    ("--batch-size", "train", "batch_size", int, "Global batch size, split over replicas.", None),
    ("--steps-per-epoch", "train", "steps_per_epoch", int, "Steps per epoch.", "one pass over the smaller patch set"),
    ("--patch-size", "data", "patch_size", int, "Training patch size in pixels.", None),
    ("--stride", "data", "stride", int, "Stride of the training patch grid.", None),
    ("--strategy", "train", "strategy", click.Choice(STRATEGIES),
     "auto: mirror over all GPUs if several; multiworker: cluster from TF_CONFIG.", None),
    ("--precision", "train", "precision", click.Choice(PRECISIONS),
     "mixed_bfloat16: bfloat16 compute with float32 weights, several times faster on CPUs with AMX/AVX512-BF16 "
     "and on recent GPUs; the saved generator is float32.", None),
    ("--lr", "train", "learning_rate", float, "Adam learning rate.", None),
    ("--decay-start-epoch", "train", "decay_start_epoch", int,
     "Decay the learning rate linearly to 0 from this epoch on.", "constant"),
    ("--gan-loss", "train", "gan_loss", click.Choice(GAN_LOSSES), "Adversarial loss.", None),
    ("--lambda-rec", "train", "lambda_rec", float, "Weight of the cycle (self-reconstruction) loss.", None),
    ("--lambda-adv", "train", "lambda_adv", float, "Weight of the adversarial loss.", None),
    ("--lambda-identity", "train", "lambda_identity", float, "Identity loss weight relative to lambda-rec.", None),
    ("--lambda-lr-consistency", "train", "lambda_lr_consistency", float,
     "Weight of the LR-consistency loss (beyond the paper): 1 - correlation of G_L(x) and x, and of G_H(y) and y, "
     "on the LR grid.", None),
    ("--lambda-periodic", "train", "lambda_periodic", float,
     "Weight of the periodic loss (beyond the paper): G_L(x)'s amplitude at the 2 and 4 px lattice frequencies.",
     None),
    ("--pool-size", "train", "pool_size", int, "History of fakes shown to the critics (0: none).", None),
    ("--ngf", "model", "ngf", int, "Generator base filters.", None),
    ("--n-blocks", "model", "n_blocks", int, "Residual blocks in the generator.", None),
    ("--upsample", "model", "upsample", click.Choice(UPSAMPLE_KINDS), "Generator upsampling.", None),
    ("--decoder-norm", "model", "decoder_norm", click.Choice(DECODER_NORMS),
     "Instance norm after each upsampling (CycleGAN), or none: a local decoder, run exactly in stripes.", None),
    ("--decoder-blur", "model", "decoder_blur", click.Choice(DECODER_BLURS),
     "binomial: a fixed [1,2,1] blur after each upsampling's activation, against 2-pixel stripes (anti-aliasing).",
     None),
    ("--dropout-rate", "model", "dropout_rate", float, "MC dropout rate.", None),
    ("--dropout-position", "model", "dropout_position", click.Choice(DROPOUT_POSITIONS), "Where MC dropout sits.",
     None),
    ("--ndf", "model", "ndf", int, "Critic base filters.", None),
    ("--checkpoint-every", "train", "checkpoint_every", int, "Steps between checkpoints.", None),
    ("--log-every", "train", "log_every", int,
     "Steps between TensorBoard scalars (and progress lines when stdout is not a terminal).", None),
    ("--image-every", "train", "image_every", int, "Steps between TensorBoard image panels.", None),
]
_DEFAULTS = Config()


def _param(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _flag_options(func):
    for flag, section, key, kind, text, none_means in reversed(_FLAGS):
        default = getattr(getattr(_DEFAULTS, section), key)
        shown = none_means if default is None else default
        func = click.option(flag, type=kind, help=f"{text}  [default: {shown}]")(func)
    return func


def overrides_from_flags(flags: dict) -> dict:
    """Nested ``{section: {key: value}}`` of the flags that were given; ``--seed`` seeds both the
    weights (train.seed) and the patch streams (data.seed) so a run can be repeated."""
    nested: dict[str, dict] = {}
    for flag, section, key, *_ in _FLAGS:
        if flags.get(_param(flag)) is not None:
            nested.setdefault(section, {})[key] = flags[_param(flag)]
    if flags.get("seed") is not None:
        nested.setdefault("train", {})["seed"] = flags["seed"]
        nested.setdefault("data", {})["seed"] = flags["seed"]
    return nested


@click.command("train")
@click.option("--lr-dir", metavar="DIR",
              help="Folder of clinical (low-resolution) volumes: NIfTI files, multi-frame DICOM files and/or one "
                   "subfolder per DICOM series (unet/srgan: read for their voxel size only). With --resume: the "
                   "run's own, unless given.")
@click.option("--hr-dir", metavar="DIR",
              help="Folder of micro-CT (high-resolution) volumes: NIfTI files, multi-frame DICOM files and/or one "
                   "subfolder per DICOM series. With --resume: the run's own, unless given.")
@click.option("--out", "run_dir", required=True, metavar="RUN_DIR",
              help="Run directory: config.yaml, logs/, checkpoints/, generator.keras. Must be new or empty.")
@click.option("--config", "config_path", metavar="FILE.yaml",
              help="YAML with data/model/train sections; flags override it. With --resume the run's own "
                   "config.yaml is the default.")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR exactly from its last checkpoint "
                                             "(settings that would change its course are refused).")
@click.option("--seed", type=int, help="Seed for weights, dropout and the patch streams.  [default: train.seed "
                                       f"{_DEFAULTS.train.seed}; data.seed drawn and kept in the checkpoint]")
@_flag_options
@user_errors
def command(lr_dir, hr_dir, run_dir, config_path, resume, **flags):
    """Train the CycleGAN (G_L: LR -> HR) on unpaired LR and HR NIfTI folders, or with --method unet|srgan
    a supervised baseline on HR patches paired with their synthetic degradation.

    Watch it with `tensorboard --logdir RUN_DIR/logs`; a killed run continues with
    `microsr-tf train --out RUN_DIR --resume`.
    """
    from microsr_tf.training.trainer import CONFIG_FILE, train

    if config_path is None and resume and os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        config_path = os.path.join(run_dir, CONFIG_FILE)
    cfg = Config.load(config_path)
    with option_values():
        cfg = cfg.override(overrides_from_flags(flags), source="command line", unset=True)
    if not resume and cfg.data.shards_dir is None:
        for flag, given, key in (("--lr-dir", lr_dir, "lr_dir"), ("--hr-dir", hr_dir, "hr_dir")):
            if given is None and getattr(cfg.data, key) is None:
                raise click.UsageError(f"Missing option '{flag}' (or data.{key} in --config, or data.shards_dir)")
    result = train(cfg, lr_dir, hr_dir, run_dir, resume=resume)
    click.echo(f"Trained {plural(result.steps, 'step')} ({plural(result.epochs, 'epoch')}): {result.generator_path}")
    if result.best_generator_path is not None:
        loss = "cycle loss" if cfg.model.method == "cyclegan" else "pixel loss"
        click.echo(f"Best epoch (mean {loss} {result.best_cycle_loss:.4f}): {result.best_generator_path}")
    drawn = [f"{name}.seed {value}" for name, value in result.seeds.items() if getattr(cfg, name).seed is None]
    if drawn:
        click.echo(f"Seeds drawn for this run (set them to repeat it): {', '.join(drawn)}")
