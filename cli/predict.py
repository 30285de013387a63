"""``microsr-tf predict``: super-resolve NIfTI volumes or DICOM series into posterior mean and variance volumes."""

from __future__ import annotations

import os
import sys

import click

from microsr_tf.config import INFERENCE_PRECISIONS, MAX_SAMPLES, MAX_SERVED_SAMPLES
from microsr_tf.errors import ConfigError, InputError

from ._common import FiniteFloat, option_values, user_errors


ROI_HELP = ("Only process voxel ranges i0:i1,j0:j1,k0:k1 of the input array (its own axis order, half-open, "
            "an empty bound means the full extent, e.g. ':,100:300,40:60'). The output affine places the "
            "sub-volume correctly in world space.")


def parse_roi(text: str | None) -> tuple[tuple[int | None, int | None], ...] | None:
    """Parse ``i0:i1,j0:j1,k0:k1`` into three (start, stop) pairs; None bounds mean the full extent.

    Mistakes are ConfigErrors; the command reports them as usage errors (exit 2).
    """
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 3:
        raise ConfigError(f"--roi: expected three ranges i0:i1,j0:j1,k0:k1, got {text!r}")
    roi = []
    for part in parts:
        bounds = part.strip().split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            lo, hi = (int(b) if b.strip() else None for b in bounds)
        except ValueError:
            raise ConfigError(f"--roi: range {part.strip()!r} is not start:stop with integer bounds") from None
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            raise ConfigError(f"--roi: range {part.strip()!r} has a negative bound")
        roi.append((lo, hi))
    return tuple(roi)


def parse_percentiles(text: str | None) -> tuple[float, ...]:
    """Parse ``5,95`` into (5.0, 95.0)."""
    if not text:
        return ()
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--percentiles: expected comma-separated numbers like 5,95, got {text!r}") from None
    return values


def parse_samples(text: str) -> int | str:
    """``--samples``: a whole number, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        samples = int(text)
    except ValueError:
        raise ConfigError(f"--samples: expected a whole number of Monte Carlo samples or 'auto', got {text!r}") from None
    if not 2 <= samples <= MAX_SAMPLES:  # time grows linearly with T: a mistyped T would run for days
        raise ConfigError(f"--samples must be in [2, {MAX_SAMPLES}] (a variance needs two), got {samples}")
    return samples


def _read_token(token_file: str | None) -> str | None:
    """The bearer token from ``token_file``, else ``MICROSR_SERVING_TOKEN``, else None."""
    if token_file is None:
        return os.environ.get("MICROSR_SERVING_TOKEN") or None
    try:
        with open(token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise InputError(token_file, f"cannot read the token file ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise InputError(token_file, "the token file is not UTF-8 text") from None
    if not token or any(c in token for c in "\r\n"):
        raise InputError(token_file, "the token file should hold the bearer token alone, on one line "
                                     f"({'it is empty' if not token else 'it has several lines'})")
    return token


class _Progress:
    """Renders predict_volume's (done, total, elapsed) callbacks on stderr: a click progress bar on a
    terminal, else a plain line every ``every`` seconds and at the end (no ANSI codes or ``\r``)."""

    def __init__(self, label: str, every: float = 10.0):
        self.label = label
        self.bar = None
        self.terminal = sys.stderr.isatty()
        self.every, self.last = every, -every

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if not self.terminal:
            if elapsed - self.last >= self.every or done == total:
                self.last = elapsed
                rate = done / elapsed if elapsed > 0 else 0.0
                click.echo(f"{self.label}: {done}/{total} slices, {rate:.2f} slices/s", err=True)
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_eta=True,
                                         show_pos=True, item_show_func=lambda s: s)
            self.bar.__enter__()
        rate = done / elapsed if elapsed > 0 else 0.0
        self.bar.update(done - self.bar.pos, current_item=f"{rate:.2f} slices/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="Trained generator: a training run directory, a .keras file or an exported SavedModel. "
                   "Required unless --server is given.")
@click.option("--out-dir", required=True, metavar="DIR",
              help="Where NAME_mean.nii.gz and NAME_var.nii.gz are written (created if missing).")
@click.option("--samples", "-T", "samples_text", default="100", show_default=True, metavar="T|auto",
              help="Monte Carlo dropout samples T per voxel (the paper uses 100). Each sample is one "
                   "stochastic pass of the part of the generator after its dropout layer (the part before "
                   "it runs once), so prediction time grows about linearly with T. From 2 to 10000. 'auto': each "
                   "slice samples until its posterior mean and variance have converged (at most 100; the T "
                   "of every slice is reported).")
@click.option("--seed", type=int, default=None,
              help="Base seed of the dropout masks; the same seed gives identical files. Default: random "
                   "(the seed used is reported). In [0, 2^31 - 1].")
@click.option("--stitch", type=click.Choice(["whole", "paper"]), default="whole", show_default=True,
              help="whole: the exact posterior of the whole slice; paper: then the paper's per-tile histogram "
                   "matching and median filter (the variance follows the same maps).")
@click.option("--tile", type=int, default=None,
              help="Height in HR pixels (a multiple of 4) of the stripes a norm-free decoder runs in. Sets "
                   "memory and speed only: any value gives the same result.  [default: sized to the memory budget]")
@click.option("--memory-budget", default="auto", show_default=True, metavar="auto|MB",
              help="Working memory for the Monte Carlo passes; auto is half the memory available. A slice "
                   "that cannot fit is refused before anything is written.")
@click.option("--roi", "roi_text", metavar="i0:i1,j0:j1,k0:k1", default=None, help=ROI_HELP)
@click.option("--axis", type=click.IntRange(0, 2), default=None,
              help="Slice axis of the input, 0, 1 or 2 (default: the model's, normally the last).")
@click.option("--std", "write_std", is_flag=True, help="Also write NAME_std.nii.gz (square root of the variance).")
@click.option("--percentiles", "percentiles_text", metavar="5,95", default=None,
              help="Also write per-voxel percentiles of the T samples as NAME_pQ.nii.gz.")
@click.option("--preview", is_flag=True,
              help="Also write NAME_preview.png: LR | posterior mean | uncertainty of the middle slice.")
@click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), default="float32", show_default=True,
              help="Convolution precision; bfloat16 is several times faster on CPUs with AMX and moves the "
                   "mean by about 1e-3.")
@click.option("--normalize", type=click.Choice(["volume", "model"]), default="volume", show_default=True,
              help="LR intensity statistics: the scan's own (as the paper and training do), or the training "
                   "scans' pooled statistics stored with the model (for scans too small to describe themselves).")
@click.option("--resample-input", is_flag=True,
              help="Accept a scan whose in-plane spacing is not the model's LR spacing: resample it to that "
                   "spacing first (bicubic, anti-aliased when it gets coarser), then super-resolve at the trained "
                   "factor. Outputs are on the model's HR spacing; their NIfTI description records the resampling.")
@click.option("--server", metavar="HOST:PORT", default=None,
              help="Run the Monte Carlo passes on a TF-Serving model server holding a microsr-tf export instead "
                   "of --model; reading, resampling, normalising and writing stay local, so the files equal a "
                   "local run's for the same seed. Plain text is refused for hosts outside loopback (see --tls).")
@click.option("--model-name", default="microsr", show_default=True, help="Model name on the server.")
@click.option("--model-version", type=click.IntRange(min=1), default=None,
              help="Model version on the server (default: the one it serves).")
@click.option("--protocol", type=click.Choice(["grpc", "rest"]), default="grpc", show_default=True,
              help="TF-Serving's gRPC API (port 8500) or its REST API (port 8501).")
@click.option("--tls", is_flag=True, help="Encrypt the connection (gRPC over TLS, HTTPS for REST).")
@click.option("--tls-ca", type=click.Path(dir_okay=False), default=None, metavar="PEM",
              help="CA bundle that signed the server's certificate (default: the system's trusted CAs).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, metavar="PEM",
              help="Client certificate, for servers that require one (with --tls-key).")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, metavar="PEM", help="Client private key.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="File holding a bearer token sent as 'authorization: Bearer', for gateways that require one "
                   "(or set MICROSR_SERVING_TOKEN). Never printed or written anywhere.")
@click.option("--insecure", is_flag=True,
              help="Allow plain text to a host outside loopback (only on a network you trust).")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds to wait for each answer of the server.")
@click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
              help="Retries while the server is unavailable, after 0.5, 1, 2, ... s.")
@click.option("--max-message-mb", type=FiniteFloat(min=0, min_open=True), default=256.0, show_default=True,
              help="Largest gRPC message sent or accepted (gRPC's own default is 4 MB).")
@user_errors
def command(inputs, model_path, out_dir, samples_text, seed, stitch, tile, memory_budget, roi_text, axis,
            write_std, percentiles_text, preview, precision, normalize, resample_input, server, model_name,
            model_version, protocol, tls, tls_ca, tls_cert, tls_key, token_file, insecure, timeout_s, retries,
            max_message_mb) -> None:
    """Super-resolve INPUT volumes into posterior mean and variance NIfTI volumes (paper eq. 4).

    An INPUT is a NIfTI volume (.nii, .nii.gz), a folder holding one DICOM series, or a multi-frame
    DICOM file. Each input is read slice by slice, upsampled to the model's HR spacing, normalised,
    predicted T times with Monte Carlo dropout and written as NAME_mean.nii.gz (HR intensity units)
    and NAME_var.nii.gz (their square) with the matching affine. A deterministic model (the U-Net and SRGAN baselines,
    or a CycleGAN without dropout) has one possible output: its variance is exactly 0, its variance
    file's header description says so, and T is not used.
    """
    from microsr_tf.export import SavedModelGenerator, load_model
    from microsr_tf.inference.mc import resolve_memory_budget
    from microsr_tf.inference.predict import (check_options, check_output_paths, output_paths, plan_volume,
                                              predict_volume, stale_temp_files)

    with option_values():
        roi = parse_roi(roi_text)
        percentiles = parse_percentiles(percentiles_text)
        samples = parse_samples(samples_text)
        check_options(samples=samples, seed=seed, stitch=stitch, tile=tile, percentiles=percentiles,
                      precision=precision, normalize=normalize)
        memory_budget = resolve_memory_budget(memory_budget)
    engine = None
    if server is None:
        if model_path is None:
            raise click.UsageError("give --model (or --server)")
        generator, meta = load_model(model_path)
        if precision != "float32" and isinstance(generator, SavedModelGenerator):
            raise InputError(model_path, f"is an exported SavedModel, which runs in float32 only; pass --precision "
                                         f"float32, or the training run or .keras file it came from for {precision}")
    else:
        if model_path is not None:
            raise click.UsageError("--model and --server are alternatives: with --server the served model is used")
        with option_values():
            if percentiles:
                raise ConfigError("--percentiles needs the raw Monte Carlo samples, which a server does not return")
            if precision != "float32":
                raise ConfigError("--precision is for local prediction; the server runs its export in float32")
            if samples == "auto":
                raise ConfigError("--samples auto is for local prediction; give the server a number of samples")
            if samples > MAX_SERVED_SAMPLES:
                raise ConfigError(f"samples must be an integer in [2, {MAX_SERVED_SAMPLES}] with --server (the most "
                                  f"an export answers), got {samples}")
        from microsr_tf.serving import ServingClient, remote_engine, served_meta

        token = _read_token(token_file)
        with option_values():  # flags that do not go together, a malformed HOST:PORT: usage errors
            client = ServingClient(server, model_name, protocol, model_version, tls=tls, ca_file=tls_ca,
                                   cert_file=tls_cert, key_file=tls_key, token=token, insecure=insecure,
                                   timeout=timeout_s, retries=retries, max_message_mb=max_message_mb)
        generator, meta = None, served_meta(client)
        engine = remote_engine(client, samples, stitch=stitch)
    plans = [plan_volume(path, meta, roi=roi, axis=axis, resample_input=resample_input)
             for path in inputs]  # refuse bad inputs up front
    seen: dict[str, str] = {}
    for plan in plans:
        if plan.name in seen:
            raise InputError(plan.input_path, f"has the same name as {seen[plan.name]}; outputs would collide")
        seen[plan.name] = plan.input_path
    check_output_paths([path for plan in plans
                        for path in output_paths(plan.name, out_dir, write_std, percentiles, preview).values()],
                       [plan.input_path for plan in plans])
    deterministic = meta.get("deterministic") is True
    method = meta.get("method", "dropout-free")
    if deterministic:
        click.echo(f"deterministic model ({method}): one output per voxel, variance "
                   f"exactly 0 (T = {samples} not used)")

    for plan in plans:
        stale = stale_temp_files(plan.name, out_dir)
        if stale:
            click.echo(f"note: {len(stale)} temporary file(s) of an interrupted run in {out_dir} are ignored and "
                       f"can be deleted: {', '.join(stale)}", err=True)
        progress = _Progress(plan.name)
        try:
            result = predict_volume(plan.input_path, generator, meta, out_dir, samples=samples, seed=seed,
                                    stitch=stitch, tile=tile, memory_budget=memory_budget, roi=roi,
                                    axis=axis, write_std=write_std, percentiles=percentiles, preview=preview,
                                    progress=progress, precision=precision, normalize=normalize,
                                    resample_input=resample_input, engine=engine)
        finally:
            progress.close()
        for path in result.outputs.values():
            click.echo(f"wrote {path}")
        click.echo(result.summary())
