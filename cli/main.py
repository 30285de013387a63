"""The ``microsr-tf`` command group. Command modules import only click and the config at import time
(the heavy libraries inside the command body), so ``--help`` never loads TensorFlow."""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys

import click

# name -> (module inside microsr_tf.cli, one-line help shown by `microsr-tf --help`)
COMMANDS = {
    "demo": ("demo", "Run the whole job on a bundled phantom and model: predict, preview, score, report."),
    "phantom": ("phantom", "Write synthetic temporal-bone phantoms (unpaired LR/HR sets + a paired test subject)."),
    "prepare": ("prepare", "Extract training patches once into TFRecord shards for fast streaming."),
    "train": ("train", "Train the CycleGAN on unpaired LR and HR NIfTI folders (or a U-Net/SRGAN baseline)."),
    "predict": ("predict", "Super-resolve NIfTI volumes into posterior mean and variance volumes."),
    "export": ("export", "Export a trained generator as a TF-Serving SavedModel returning mean and variance."),
    "evaluate": ("evaluate", "Score predictions against bicubic and real micro-CT: m-HuM, LR consistency, realism, "
                             "PSNR/SSIM, uncertainty quality."),
    "reproduce": ("reproduce", "The paper's Table 2 end to end on phantoms within a time budget: train, predict, "
                               "evaluate, report."),
    "rating-study": ("rating_study", "Blinded rating study: a static page for raters; boxplots and Wilcoxon tests."),
}


class LazyGroup(click.Group):
    """A group whose subcommands live in modules imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if _available(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not _available(COMMANDS[name][0]):
            return None
        return importlib.import_module(f"{__package__}.{COMMANDS[name][0]}").command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(module: str) -> bool:
    return importlib.util.find_spec(f"{__package__}.{module}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="microsr-tf")
def cli() -> None:
    """microsr-tf: clinical CT to micro-CT super-resolution that says how sure it is."""


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point; quiets TensorFlow's C++ start-up chatter unless asked otherwise. SIGTERM (what
    a batch scheduler or ``kill`` sends) stops a command as Ctrl-C does: its temporary files are removed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    signal.signal(signal.SIGTERM, _interrupted)
    cli(prog_name="microsr-tf")


if __name__ == "__main__":
    sys.exit(main())
