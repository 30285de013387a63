"""``microsr-tf prepare``: extract the training patches once into TFRecord shards for fast streaming."""

from __future__ import annotations

import click

from microsr_tf.config import Config, DataConfig

from ._common import option_values, user_errors


@click.command("prepare")
@click.option("--lr-dir", required=True, metavar="DIR",
              help="Folder of clinical (low-resolution) volumes: NIfTI files and/or one subfolder per DICOM series.")
@click.option("--hr-dir", required=True, metavar="DIR",
              help="Folder of micro-CT (high-resolution) volumes: NIfTI files and/or one subfolder per DICOM series.")
@click.option("--out", "out_dir", required=True, metavar="SHARDS_DIR",
              help="New folder for the shards and index.json (must not exist or be empty).")
@click.option("--patch-size", type=int,
              help=f"Training patch size in pixels.  [default: {DataConfig.patch_size}]")
@click.option("--stride", type=int, help=f"Stride of the training patch grid.  [default: {DataConfig.stride}]")
@click.option("--config", "config_path", metavar="FILE.yaml",
              help="YAML whose data section sets patch size, stride, foreground filter and ROI; flags override it.")
@click.option("--dtype", type=click.Choice(["uint16", "float16", "float32"]), default="uint16", show_default=True,
              help="How patches are stored: uint16 quantises [0, 1] in 1/65535 steps at half the size of float32.")
@user_errors
def command(lr_dir, hr_dir, out_dir, patch_size, stride, config_path, dtype) -> None:
    """Write every training patch of LR-DIR and HR-DIR into TFRecord shards plus index.json.

    Train on them with `data.shards_dir: SHARDS_DIR` in the config, with the data settings used here
    (patch size, stride, ROI thresholds and margin, axis).
    """
    from microsr_tf.pipeline import prepare_shards, read_shard_index

    cfg = Config.load(config_path)
    with option_values():
        cfg = cfg.override({"data": {"patch_size": patch_size, "stride": stride}}, source="command line", unset=True)
    out = prepare_shards(lr_dir, hr_dir, out_dir, cfg.data, dtype=dtype)
    index = read_shard_index(out)
    n_files = len(index["shards"]["lr"]) + len(index["shards"]["hr"])
    click.echo(f"wrote {index['counts']['lr']} LR and {index['counts']['hr']} HR patches of "
               f"{index['patch_size']} px ({dtype}) in {n_files} shards to {out}")
