"""``microsr-tf reproduce``: the paper's Table 2 end to end on phantoms, within a time budget."""

from __future__ import annotations

import math
import sys

import click

from microsr_tf.config import MAX_SAMPLES
from microsr_tf.presets import PRESETS

from ._common import user_errors


@click.command("reproduce")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Output folder: phantoms/, runs/, predictions/, evaluation/, report.md. A folder holding a "
                   "reproduce run with the same settings is resumed; finished stages are skipped.")
@click.option("--budget", required=True, metavar="DURATION",
              help="Wall-clock time the whole run may take on this machine, e.g. 45m, 1h30m, 5400s. It is split "
                   "equally between the three methods' training after the phantoms, a timed warm-up and the "
                   "estimated prediction and evaluation (README: Reproduce).")
@click.option("--size", type=click.Choice(["adult", "small"]), default=None,
              help="Phantom size (see `microsr-tf phantom --help`).  [default: adult]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the phantoms, the weights and patch streams, the dropout masks and the evaluation.")
@click.option("--samples", "-T", type=click.IntRange(min=2, max=MAX_SAMPLES), default=100, show_default=True,
              help="Monte Carlo samples of the CycleGAN's prediction (the baselines are deterministic: one pass).")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu", show_default=True,
              help="cpu: the CPU recipes in microsr_tf/presets/*.yaml. tiny: for tests and smoke runs only, a "
                   "96 px phantom of its own (no --size) and networks of a few filters; a run takes about a "
                   "minute and its numbers mean nothing.")
@user_errors
def command(out_dir, budget, size, seed, samples, preset) -> None:
    """Reproduce the paper's Table 2 on phantoms: phantoms -> train the CycleGAN, U-Net and SRGAN within the
    time budget -> predict the test subject under its own and a held-out scanner profile -> evaluate (bicubic
    always a row) -> DIR/report.md with m-HuM per method beside the paper's figures and every metric.

    A rerun with the same settings skips finished stages and resumes an interrupted one.
    """
    from microsr_tf.reproduce import CASES, LABELS, reproduce

    result = reproduce(out_dir, budget, size=size, seed=seed, samples=samples, preset=preset,
                       say=lambda message: click.echo(message), show_training=sys.stdout.isatty())
    click.echo("")
    click.echo("m-HuM (lower is better)      " + "  ".join(f"{case:>10}" for case in CASES))
    names = list(result.mhum[CASES[0]])
    for name in names:
        cells = []
        for case in CASES:
            value = result.mhum[case].get(name, math.nan)
            cells.append(f"{'—' if math.isnan(value) else format(value, '.3f'):>10}")
        click.echo(f"{LABELS.get(name, name):<28} " + "  ".join(cells))
    click.echo(f"report: {result.report} ({result.seconds / 60:.1f} min in this run)")
