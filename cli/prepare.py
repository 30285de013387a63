"""``microsr-tf prepare``: extract the training patches once into TFRecord shards for fast streaming."""

from __future__ import annotations

import click

from ._common import user_errors


@click.command("prepare")
@click.option("--lr-dir", required=True, metavar="DIR",
              help="Folder of clinical (low-resolution) volumes: NIfTI files and/or one subfolder per DICOM series.")
@click.option("--hr-dir", required=True, metavar="DIR",
              help="Folder of micro-CT (high-resolution) volumes: NIfTI files and/or one subfolder per DICOM series.")
@click.option("--out", "out_dir", required=True, metavar="SHARDS_DIR",
              help="New folder for the shards and index.json (must not exist or be empty).")
@click.option("--patch-size", type=int, help="Training patch size in pixels.  [default: 256]")
@click.option("--stride", type=int, help="Stride of the training patch grid.  [default: 128]")
@click.option("--config", "config_path", metavar="FILE.yaml",
              help="YAML whose data section sets patch size, stride, foreground filter and ROI; flags override it.")
@click.option("--dtype", type=click.Choice(["uint16", "float16", "float32"]), default="uint16", show_default=True,
              help="How patches are stored: uint16 quantises [0, 1] in 1/65535 steps at half the size of float32.")
@user_errors
def command(lr_dir, hr_dir, out_dir, patch_size, stride, config_path, dtype) -> None:
    """Write every training patch of LR-DIR and HR-DIR into TFRecord shards plus index.json.

    Train on them with `data.shards_dir: SHARDS_DIR` in the config; the patch size must match.
    """
    from microsr_tf.config import Config
    from microsr_tf.pipeline import prepare_shards, read_shard_index

    data = {key: value for key, value in (("patch_size", patch_size), ("stride", stride)) if value is not None}
    cfg = Config.load(config_path, {"data": data})
    out = prepare_shards(lr_dir, hr_dir, out_dir, cfg.data, dtype=dtype)
    index = read_shard_index(out)
    n_files = len(index["shards"]["lr"]) + len(index["shards"]["hr"])
    click.echo(f"wrote {index['counts']['lr']} LR and {index['counts']['hr']} HR patches of "
               f"{index['patch_size']} px ({dtype}) in {n_files} shards to {out}")
