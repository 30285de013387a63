"""``microsr-tf train``: train the CycleGAN on unpaired LR and HR NIfTI folders (or a supervised
U-Net/SRGAN baseline on degraded HR patches) into a run directory."""

from __future__ import annotations

import os

import click

from microsr_tf.config import DROPOUT_POSITIONS, GAN_LOSSES, METHODS, PRECISIONS, STRATEGIES, UPSAMPLE_KINDS

from ._common import user_errors

# option name -> (config section, key); flags left out keep the YAML/default value
_OVERRIDES = {
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "steps_per_epoch": ("train", "steps_per_epoch"),
    "strategy": ("train", "strategy"),
    "precision": ("train", "precision"),
    "lr": ("train", "learning_rate"),
    "decay_start_epoch": ("train", "decay_start_epoch"),
    "gan_loss": ("train", "gan_loss"),
    "lambda_rec": ("train", "lambda_rec"),
    "lambda_adv": ("train", "lambda_adv"),
    "lambda_identity": ("train", "lambda_identity"),
    "pool_size": ("train", "pool_size"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "log_every": ("train", "log_every"),
    "image_every": ("train", "image_every"),
    "patch_size": ("data", "patch_size"),
    "stride": ("data", "stride"),
    "ngf": ("model", "ngf"),
    "n_blocks": ("model", "n_blocks"),
    "upsample": ("model", "upsample"),
    "dropout_rate": ("model", "dropout_rate"),
    "dropout_position": ("model", "dropout_position"),
    "ndf": ("model", "ndf"),
    "method": ("model", "method"),
    "degradation_noise": ("data", "degradation_noise"),
    "srgan_adv_weight": ("train", "srgan_adv_weight"),
}


def overrides_from_flags(flags: dict) -> dict:
    """Nested ``{section: {key: value}}`` of the flags that were given; ``--seed`` seeds both the
    weights (train.seed) and the patch streams (data.seed) so a run can be repeated."""
    nested: dict[str, dict] = {}
    for name, (section, key) in _OVERRIDES.items():
        if flags.get(name) is not None:
            nested.setdefault(section, {})[key] = flags[name]
    if flags.get("seed") is not None:
        nested.setdefault("train", {})["seed"] = flags["seed"]
        nested.setdefault("data", {})["seed"] = flags["seed"]
    return nested


@click.command("train")
@click.option("--lr-dir", metavar="DIR",
              help="Folder of clinical (low-resolution) volumes: NIfTI files and/or one subfolder per DICOM series "
                   "(unet/srgan: read for their voxel size only).")
@click.option("--hr-dir", metavar="DIR",
              help="Folder of micro-CT (high-resolution) volumes: NIfTI files and/or one subfolder per DICOM series.")
@click.option("--out", "run_dir", required=True, metavar="RUN_DIR",
              help="Run directory: config.yaml, logs/, checkpoints/, generator.keras. Must be new or empty.")
@click.option("--config", "config_path", metavar="FILE.yaml",
              help="YAML with data/model/train sections; flags override it. With --resume the run's own "
                   "config.yaml is the default.")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from its last checkpoint.")
@click.option("--method", type=click.Choice(METHODS),
              help="cyclegan: the paper's unpaired CycleGAN with MC dropout; unet, srgan: the paper's supervised "
                   "baselines, trained on HR patches degraded to the LR voxel size (the LR folder gives the "
                   "spacing only).  [default: cyclegan]")
@click.option("--degradation-noise", type=float,
              help="unet/srgan: std of the Gaussian noise added on the LR grid, normalised units.  [default: 0.05]")
@click.option("--srgan-adv-weight", type=float, help="srgan: adversarial weight next to the pixel MSE.  [default: 1e-3]")
@click.option("--epochs", type=int, help="Epochs to train (total, counting resumed ones).  [default: 50]")
@click.option("--batch-size", type=int, help="Global batch size, split over replicas.  [default: 5]")
@click.option("--steps-per-epoch", type=int, help="Steps per epoch.  [default: one pass over the smaller patch set]")
@click.option("--patch-size", type=int, help="Training patch size in pixels.  [default: 256]")
@click.option("--stride", type=int, help="Stride of the training patch grid.  [default: 128]")
@click.option("--strategy", type=click.Choice(STRATEGIES),
              help="auto: mirror over all GPUs if several; multiworker: cluster from TF_CONFIG.  [default: auto]")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="mixed_bfloat16: bfloat16 compute with float32 weights, several times faster on CPUs with "
                   "AMX/AVX512-BF16 and on recent GPUs; the saved generator is float32.  [default: float32]")
@click.option("--seed", type=int, help="Seed for weights, dropout and the patch streams.")
@click.option("--lr", type=float, help="Adam learning rate.  [default: 1e-4]")
@click.option("--decay-start-epoch", type=int, help="Decay the learning rate linearly to 0 from this epoch on.")
@click.option("--gan-loss", type=click.Choice(GAN_LOSSES), help="Adversarial loss.  [default: bce]")
@click.option("--lambda-rec", type=float, help="Weight of the cycle (self-reconstruction) loss.  [default: 10]")
@click.option("--lambda-adv", type=float, help="Weight of the adversarial loss.  [default: 1]")
@click.option("--lambda-identity", type=float, help="Identity loss weight relative to lambda-rec.  [default: 0]")
@click.option("--pool-size", type=int, help="History of fakes shown to the critics (0: none).  [default: 0]")
@click.option("--ngf", type=int, help="Generator base filters.  [default: 64]")
@click.option("--n-blocks", type=int, help="Residual blocks in the generator.  [default: 9]")
@click.option("--upsample", type=click.Choice(UPSAMPLE_KINDS), help="Generator upsampling.  [default: transpose]")
@click.option("--dropout-rate", type=float, help="MC dropout rate.  [default: 0.5]")
@click.option("--dropout-position", type=click.Choice(DROPOUT_POSITIONS), help="Where MC dropout sits.  "
              "[default: bottleneck]")
@click.option("--ndf", type=int, help="Critic base filters.  [default: 64]")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints.  [default: 100]")
@click.option("--log-every", type=int, help="Steps between TensorBoard scalars.  [default: 10]")
@click.option("--image-every", type=int, help="Steps between TensorBoard image panels.  [default: 100]")
@user_errors
def command(lr_dir, hr_dir, run_dir, config_path, resume, **flags):
    """Train the CycleGAN (G_L: LR -> HR) on unpaired LR and HR NIfTI folders, or with --method unet|srgan
    a supervised baseline on HR patches paired with their synthetic degradation.

    Watch it with `tensorboard --logdir RUN_DIR/logs`; a killed run continues with --resume.
    """
    from microsr_tf.config import Config
    from microsr_tf.training.trainer import CONFIG_FILE, train

    if config_path is None and resume and os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        config_path = os.path.join(run_dir, CONFIG_FILE)
    cfg = Config.load(config_path, overrides_from_flags(flags))
    result = train(cfg, lr_dir, hr_dir, run_dir, resume=resume)
    click.echo(f"Trained {result.steps} steps ({result.epochs} epochs): {result.generator_path}")
    if result.best_generator_path is not None:
        loss = "cycle loss" if cfg.model.method == "cyclegan" else "pixel loss"
        click.echo(f"Best epoch (mean {loss} {result.best_cycle_loss:.4f}): {result.best_generator_path}")
