"""The paper's Table 2 end to end on phantoms, within a time budget: the library side of
``microsr-tf reproduce``.

Phantoms -> train the CycleGAN and the supervised U-Net and SRGAN baselines -> predict the paired test
subject under its own scanner profile and under the held-out one -> evaluate (bicubic always a row) ->
``DIR/report.md``. Stages, their outputs under ``DIR`` and their completion markers::

    phantoms              phantoms/ (``microsr-tf phantom``: unpaired lr/ and hr/, the test subject)
    plan                  plan.json: warm-up measurements and the steps each method trains
    train-METHOD          runs/METHOD/ (a ``microsr-tf train`` run directory with its config.yaml)
    predict-CASE-METHOD   predictions/CASE/METHOD/ (``microsr-tf predict`` outputs)
    evaluate-CASE         evaluation/CASE/ (an ``microsr-tf evaluate`` report)
    report                report.md

A stage's marker ``stages/NAME.done`` is written atomically only after its outputs are complete. A rerun
skips the stages that are marked and whose outputs exist, and redoes the first one that is not and every
later one: an interrupted training resumes from its last checkpoint, any other interrupted stage starts
over. ``reproduce.json`` records the settings; a folder holding another run's settings is refused.

Budget rule (documented in the README): the budget is wall-clock time on this machine for the whole
run. After the phantoms, each method trains a few warm-up steps on the real data (the first step traces
the graph) and the posterior of one test slice is timed; prediction and evaluation are estimated from
those, 5% of the budget is kept as a margin, and what remains is split equally between the three methods
-- a comparison at equal compute. Each method trains as many steps as its share holds at its measured
time per step.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from . import presets
from .config import MAX_SAMPLES, Config
from .errors import ConfigError, InputError, MicrosrError
from .files import atomic_write_text
from .phantoms import HELD_OUT_PROFILES, PROFILE_ROLE, PhantomSpec, get_spec, write_phantoms
from .volumes import open_volume, write_volume

METHODS = ("cyclegan", "unet", "srgan")
LABELS = {"cyclegan": "CycleGAN", "unet": "U-Net", "srgan": "SRGAN"}
PAPER_MHUM = {"unet": 3.12, "srgan": 1.29, "cyclegan": 0.28}  # Li et al., ISBI 2021, Table 2 (real scans)
CASES = ("own", "held-out")  # the test subject under its own scanner profile, and under the held-out one
HELD_OUT_PROFILE = HELD_OUT_PROFILES[0]
MARGIN = 0.05  # share of the budget kept free for what the estimates miss
PREDICT_SAFETY = 1.15  # measured prediction time is scaled by this for reading, writing and slice overheads
SETTINGS_FILE = "reproduce.json"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.md"
STAGE_DIR = "stages"

Say = Callable[[str], None]


class BudgetTooSmall(MicrosrError):
    """The time budget cannot train every method for its minimum number of steps."""


# ----- budgets ----------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(hours?|h|minutes?|min|m|seconds?|sec|s)(?![a-z])",
                       re.IGNORECASE)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_budget(text: str) -> float:
    """``45m``, ``1h30m``, ``90s``, ``1.5h``, ``2h 15min`` -> seconds; ConfigError for anything else."""
    raw = str(text).strip()
    pos, total, units = 0, 0.0, []
    for match in _DURATION.finditer(raw):
        if raw[pos:match.start()].strip():
            break
        unit = match.group(2)[0].lower()
        if unit in units:
            raise ConfigError(f"--budget {text!r}: the unit {unit!r} is given twice (write e.g. 45m or 1h30m)")
        units.append(unit)
        total += float(match.group(1)) * _UNIT_SECONDS[unit]
        pos = match.end()
    if not units or raw[pos:].strip():
        raise ConfigError(f"--budget {text!r}: not a duration; write hours, minutes and/or seconds with their "
                          "units, e.g. 45m, 1h30m, 90s or 1.5h")
    if not math.isfinite(total) or total <= 0:
        raise ConfigError(f"--budget {text!r}: must be longer than zero")
    return total


def format_duration(seconds: float) -> str:
    """A budget as the user would write it: ``45m``, ``1h30m``, ``1m30s``, ``20s``."""
    s = int(round(seconds))
    if s == 0 and seconds > 0:
        return f"{seconds:.3g}s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


@dataclass(frozen=True)
class Reference:
    """Seconds measured on the reference machine (README: 2 shared cores at load 5-6) for one phantom
    size: what the refusal before anything runs is based on. Once running, measurements replace them."""

    phantoms: float  # writing the phantoms
    setup: float  # per method: reading the data, building the model, tracing, the warm-up
    step: Mapping[str, float]  # seconds per training step, per method
    predict_base: float  # one case: every method's prediction apart from the CycleGAN's MC samples
    predict_sample: float  # one case: the CycleGAN's cost per Monte Carlo sample
    evaluate: float  # one case


@dataclass(frozen=True)
class Preset:
    """Recipes and run sizes of one ``--preset``."""

    name: str
    sizes: tuple[str, ...]  # phantom sizes it offers; the first is the default
    subjects: int  # unpaired training subjects per domain (the paper: six LR and six HR scans)
    epoch_steps: int  # steps per epoch aimed at (an epoch ends with a checkpoint and the best-epoch choice)
    max_epochs: int  # beyond epoch_steps x max_epochs steps, epochs get longer instead of more numerous
    warmup_steps: int  # warm-up steps timed per method (after the first, which traces the graph)
    min_steps: int  # fewest training steps per method worth running: below it the budget is refused
    reference: Mapping[str, Reference]  # per size
    spec: PhantomSpec | None = None  # its own phantom grid (tiny), else the size's
    max_steps: int | None = None  # a cap on the steps per method whatever the budget (tiny: a run stays short)

    def phantom_spec(self, size: str) -> PhantomSpec:
        return self.spec if self.spec is not None else get_spec(size)

    def config(self, method: str) -> Config:
        """The method's recipe (a ``train --config`` YAML stored in the package)."""
        return Config.load(presets.path(method, self.name))


# A 96 px phantom (12 px LR, 6 slices) with the anatomy at 0.3 of an adult's: the cochlea, vestibule and
# canals in a 5.8 mm field, rendered in about a second.
TINY_SPEC = PhantomSpec("tiny", (96, 96, 6), (0.06, 0.06, 0.06), (12, 12, 6), (0.48, 0.48, 0.06),
                        anatomy_scale=0.3, slab_shift=0.05)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        "cpu", sizes=("adult", "small"), subjects=6, epoch_steps=250, max_epochs=20, warmup_steps=8, min_steps=50,
        reference={
            "adult": Reference(phantoms=330.0, setup=60.0, step={"cyclegan": 1.6, "unet": 0.5, "srgan": 1.2},
                               predict_base=40.0, predict_sample=2.2, evaluate=240.0),
            "small": Reference(phantoms=100.0, setup=45.0, step={"cyclegan": 1.6, "unet": 0.5, "srgan": 1.2},
                               predict_base=15.0, predict_sample=0.5, evaluate=60.0),
        }),
    "tiny": Preset(
        "tiny", sizes=("tiny",), subjects=2, epoch_steps=6, max_epochs=2, warmup_steps=3, min_steps=4,
        reference={"tiny": Reference(phantoms=3.0, setup=20.0, step={"cyclegan": 0.1, "unet": 0.03, "srgan": 0.08},
                                     predict_base=5.0, predict_sample=0.01, evaluate=10.0)},
        spec=TINY_SPEC, max_steps=12),
}


@dataclass(frozen=True)
class RunSettings:
    """What a reproduce folder's outputs depend on besides the budget (checked when a run resumes)."""

    size: str
    seed: int
    samples: int
    preset: str

    def flags(self) -> str:
        """The command-line options that make these settings."""
        size = "" if PRESETS[self.preset].spec is not None else f"--size {self.size} "
        return f"{size}--seed {self.seed} --samples {self.samples} --preset {self.preset}"


def resolve_settings(size: str | None = None, seed: int = 0, samples: int = 100, preset: str = "cpu") -> RunSettings:
    """Check the options; ``size`` None takes the preset's default. ConfigError names the option."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset: must be one of {', '.join(PRESETS)}, got {preset!r}")
    choice = PRESETS[preset]
    if size is None:
        size = choice.sizes[0]
    if size not in choice.sizes:
        raise ConfigError(f"--size {size}: the {preset} preset runs on "
                          + (f"its own {choice.sizes[0]} phantom; leave --size out" if choice.spec is not None
                             else "sizes " + ", ".join(choice.sizes)))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or not 2 <= samples <= MAX_SAMPLES:
        raise ConfigError(f"--samples must be an integer in [2, {MAX_SAMPLES}] (a variance needs two samples), "
                          f"got {samples!r}")
    return RunSettings(size=size, seed=seed, samples=samples, preset=preset)


def minimum_budget(settings: RunSettings) -> tuple[float, dict[str, float]]:
    """The smallest budget worth starting, from the reference machine's figures: seconds and parts."""
    preset = PRESETS[settings.preset]
    ref = preset.reference[settings.size]
    steps = max(preset.min_steps * ref.step[m] for m in METHODS)  # equal shares: the slowest method binds
    parts = {
        "phantoms": ref.phantoms,
        "warm-up and set-up": len(METHODS) * ref.setup,
        f"training ({preset.min_steps} steps per method)": len(METHODS) * steps,
        "prediction": len(CASES) * (ref.predict_base + settings.samples * ref.predict_sample),
        "evaluation": len(CASES) * ref.evaluate,
    }
    return sum(parts.values()) / (1 - MARGIN), parts


def check_budget(budget_s: float, settings: RunSettings) -> None:
    """Refuse, before anything is written, a budget below :func:`minimum_budget`."""
    needed, parts = minimum_budget(settings)
    if budget_s < needed:
        detail = ", ".join(f"{name} {minutes(s)}" for name, s in parts.items())
        raise BudgetTooSmall(
            f"--budget {format_duration(budget_s)} is too small to train anything: {settings.preset} preset, "
            f"{settings.size} phantoms, T = {settings.samples} needs at least --budget "
            f"{format_duration(60 * math.ceil(needed / 60))} on a 2-core CPU ({detail}, plus {MARGIN:.0%} margin)")


@dataclass
class MethodPlan:
    """One method's measured speed and the training it gets."""

    method: str
    step_s: float  # measured seconds per training step
    setup_s: float  # measured: reading the data, building and tracing
    checkpoint_s: float  # measured seconds per checkpoint (every checkpoint_every steps and at each epoch end)
    epoch_s: float  # measured per-epoch extras: a checkpoint, the best generator's file, the TensorBoard panel
    checkpoint_every: int  # the recipe's train.checkpoint_every
    predict_first_s: float  # measured seconds for the first test slice (tracing included)
    predict_slice_s: float  # measured seconds per further test slice at the run's T (one pass for the baselines)
    steps: int = 0
    epochs: int = 0
    steps_per_epoch: int = 0
    planned_s: float = 0.0  # setup + steps x step time + checkpoints + per-epoch extras

    def cost(self, steps: int, epochs: int) -> float:
        """Seconds to train ``steps`` steps in ``epochs`` epochs, set-up included."""
        return self.setup_s + steps * (self.step_s + self.checkpoint_s / self.checkpoint_every) + epochs * self.epoch_s


@dataclass
class Plan:
    """How the budget is spent; written to ``plan.json``."""

    budget_s: float
    spent_s: float  # phantoms and warm-up, before planning
    predict_s: float  # estimated prediction, all cases and methods
    evaluate_s: float  # estimated evaluation, all cases
    margin_s: float
    share_s: float  # training time per method
    methods: dict[str, MethodPlan] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Plan":
        methods = {k: MethodPlan(**v) for k, v in raw["methods"].items()}
        return cls(**{**raw, "methods": methods})


def split_budget(budget_s: float, spent_s: float, predict_s: float, evaluate_s: float,
                 measured: Mapping[str, MethodPlan], min_steps: int, epoch_steps: int, max_epochs: int,
                 max_steps: int | None = None) -> Plan:
    """The budget rule: keep ``MARGIN`` of the budget and the estimated prediction and evaluation, split
    the rest equally between the methods, and give each the most steps whose :meth:`MethodPlan.cost`
    fits its share (at most ``max_steps``), as equal epochs of about ``epoch_steps`` steps, at most
    ``max_epochs`` of them (the total is rounded down to a multiple of the epochs).

    BudgetTooSmall (one line, with the budget that would do) when a method's share holds fewer than
    ``min_steps`` steps.
    """
    margin = MARGIN * budget_s
    training = budget_s - margin - spent_s - predict_s - evaluate_s
    share = training / len(measured)
    plan = Plan(budget_s=budget_s, spent_s=spent_s, predict_s=predict_s, evaluate_s=evaluate_s, margin_s=margin,
                share_s=share)

    def n_epochs(steps: int) -> int:
        return min(max_epochs, max(1, math.ceil(steps / epoch_steps)))

    for name, m in measured.items():
        per_step = m.step_s + m.checkpoint_s / m.checkpoint_every
        epochs, steps = 1, 0
        for _ in range(max_epochs + 1):  # reserve the per-epoch extras of as many epochs as the steps make
            steps = int(max(0.0, share - m.setup_s - epochs * m.epoch_s) // per_step)
            if max_steps is not None:
                steps = min(steps, max_steps)
            if n_epochs(steps) <= epochs:
                break
            epochs = n_epochs(steps)
        if steps < min_steps:
            worst = max(x.cost(min_steps, 1) for x in measured.values())
            needed = (spent_s + predict_s + evaluate_s + len(measured) * worst) / (1 - MARGIN)
            raise BudgetTooSmall(
                f"--budget {format_duration(budget_s)} is too small: measured on this machine now, "
                f"{LABELS.get(name, name)} would train {steps} steps (at least {min_steps} needed; "
                f"{m.step_s:.2f} s/step); give --budget {format_duration(60 * math.ceil(needed / 60))} or more "
                "(the finished stages are kept)")
        epochs = n_epochs(steps)
        per_epoch = steps // epochs
        plan.methods[name] = dataclasses.replace(m, steps=epochs * per_epoch, epochs=epochs,
                                                 steps_per_epoch=per_epoch,
                                                 planned_s=m.cost(epochs * per_epoch, epochs))
    return plan


# ----- the folder, its settings and its stage markers ------------------------------------------------


def stage_names() -> list[str]:
    """Every stage in the order it runs."""
    return (["phantoms", "plan"] + [f"train-{m}" for m in METHODS]
            + [f"predict-{c}-{m}" for m in METHODS for c in CASES] + [f"evaluate-{c}" for c in CASES] + ["report"])


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"is not {what}")
    return data


def check_out_dir(out: str | os.PathLike, settings: RunSettings, budget_s: float) -> bool:
    """Check ``out`` before anything is written; True when it holds a run of the same settings to resume.

    Refused with one line: a file; a non-empty folder that is not a reproduce folder; a reproduce folder
    with other settings; one whose plan was made for another budget; an unwritable parent.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory; choose an output folder")
    if out.is_dir() and any(out.iterdir()):
        settings_path = out / SETTINGS_FILE
        if not settings_path.is_file():
            raise InputError(out, f"is not empty and holds no reproduce run (no {SETTINGS_FILE}); choose a new or "
                                  "empty folder")
        raw = _read_json(settings_path, "the settings of a reproduce run")
        saved = raw.get("settings", {})
        if saved != dataclasses.asdict(settings):
            try:
                flags = RunSettings(**saved).flags()
            except TypeError:
                flags = json.dumps(saved)
            raise InputError(out, f"holds a reproduce run made with {flags}; this one asks for {settings.flags()}. "
                                  "Rerun with its settings to resume it, or choose another folder")
        plan_path = out / PLAN_FILE
        if (out / STAGE_DIR / "plan.done").is_file() and plan_path.is_file():
            planned = _read_json(plan_path, "a reproduce plan").get("budget_s")
            if planned is not None and abs(float(planned) - budget_s) > 0.5:
                raise InputError(out, f"was planned for --budget {format_duration(float(planned))}; rerun with that "
                                      "budget to resume it, or choose another folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(out, "is not writable")
        return True
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(parent, "is not a writable folder; the output folder cannot be created under it")
    return False


class Stages:
    """Completion markers under ``DIR/stages``: ``NAME.done`` holds JSON about the finished stage."""

    def __init__(self, out: Path):
        self.dir = out / STAGE_DIR

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.done"

    def get(self, name: str) -> dict | None:
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: treated as not done

    def mark(self, name: str, info: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(name), json.dumps(dict(info), indent=2, default=str) + "\n")

    def clear_from(self, name: str) -> None:
        """Remove the markers of ``name`` and of every later stage (they depend on it)."""
        names = stage_names()
        for later in names[names.index(name):]:
            self.path(later).unlink(missing_ok=True)


# ----- the machine -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, logical CPUs, load averages and library versions, for the report."""
    import tensorflow as tf

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    gpus = len(tf.config.list_physical_devices("GPU"))
    return {"cpu": model, "logical_cpus": os.cpu_count(), "load_average": load, "gpus": gpus,
            "python": platform.python_version(), "tensorflow": tf.__version__}


def describe_machine(info: Mapping[str, Any]) -> str:
    load = info.get("load_average")
    return (f"{info['cpu']}, {info['logical_cpus']} logical CPUs, "
            + (f"{info['gpus']} GPU(s)" if info.get("gpus") else "no GPU")
            + (f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)" if load else "")
            + f"; Python {info['python']}, TensorFlow {info['tensorflow']}")


# ----- the run ------------------------------------------------------------------------------------------


@dataclass
class ReproduceResult:
    out_dir: Path
    report: Path
    mhum: dict[str, dict[str, float]]  # case -> row name -> m-HuM
    seconds: float  # this invocation
    skipped: list[str]  # stages found finished


@dataclass
class _Inputs:
    """Paths inside the phantom folder that later stages read."""

    lr_dir: Path
    hr_dir: Path
    truth: Path
    cases: dict[str, Path]  # case -> LR scan of the test subject
    profiles: dict[str, str]  # case -> scanner profile


def _phantom_inputs(root: Path) -> _Inputs:
    manifest = _read_json(root / "manifest.json", "a phantom manifest")
    files = manifest["files"]
    own = next(f for f in files if f["role"] == "test_lr")
    held = next(f for f in files if f["role"] == PROFILE_ROLE and f["profile"] == HELD_OUT_PROFILE)
    truth = next(f for f in files if f["role"] == "test_hr")
    return _Inputs(lr_dir=root / "lr", hr_dir=root / "hr", truth=root / truth["path"],
                   cases={"own": root / own["path"], "held-out": root / held["path"]},
                   profiles={"own": own["profile"], "held-out": held["profile"]})


def _step_timer():
    """A Keras callback recording each training step's wall time in ``durations``."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.durations: list[float] = []
            self._began = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._began = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.durations.append(time.perf_counter() - self._began)

    return StepTimer()


def _time_posterior(generator, shape: tuple[int, int], samples: int) -> tuple[float, float]:
    """``(first, per_slice)``: seconds for the first posterior of a ``shape`` slice (tracing included) and
    for each further one at ``samples``. A deterministic generator is timed at one pass; a stochastic one
    at 2 and 6 samples, extrapolated linearly to ``samples``."""
    from .inference.mc import MonteCarloPredictor, is_deterministic
    from .inference.stitching import predict_slice

    image = np.random.default_rng(0).random(shape, dtype=np.float32)

    def timed(t: int) -> tuple[float, float]:
        predictor = MonteCarloPredictor(generator, samples=t, seed=0)
        began = time.perf_counter()
        predict_slice(predictor, image)  # traces
        middle = time.perf_counter()
        predict_slice(predictor, image)
        return middle - began, time.perf_counter() - middle

    first, low = timed(2)
    if is_deterministic(generator):
        return first, low
    high = timed(6)[1]
    per_slice = low + (samples - 2) * max(0.0, (high - low) / 4)
    return first - low + per_slice, per_slice


def _throttled(say: Say, every: float = 30.0) -> Say:
    """``say`` for a progress stream: ``NAME: k/n slices`` lines only every ``every`` seconds and at n/n."""
    pattern = re.compile(r".*: (\d+)/(\d+) slices.*")
    last = [-math.inf]

    def emit(message: str) -> None:
        match = pattern.fullmatch(message)
        if match and match.group(1) != match.group(2) and time.perf_counter() - last[0] < every:
            return
        if match:
            last[0] = time.perf_counter()
        say(message)

    return emit


def _train_config(preset: Preset, method: str, seed: int, steps_per_epoch: int, epochs: int) -> Config:
    return preset.config(method).override({
        "data": {"seed": seed},
        "train": {"seed": seed, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                  "image_every": steps_per_epoch}}, source=f"reproduce {method}")


def _clear_keras() -> None:
    import keras

    keras.backend.clear_session()
    gc.collect()


class Reproduction:
    """One ``microsr-tf reproduce`` invocation on an output folder."""

    def __init__(self, out_dir: str | os.PathLike, budget_s: float, settings: RunSettings, say: Say | None = None,
                 show_training: bool = False):
        self.out = Path(out_dir)
        self.budget_s = float(budget_s)
        self.settings = settings
        self.preset = PRESETS[settings.preset]
        self.say = say or (lambda message: None)
        self.show_training = show_training
        self.stages = Stages(self.out)
        self.start = time.perf_counter()
        self.carried = 0.0  # seconds recorded by stages finished in earlier invocations

    # -- bookkeeping --

    @property
    def spent(self) -> float:
        return self.carried + time.perf_counter() - self.start

    def _announce(self, index: int, name: str, what: str) -> None:
        left = self.budget_s - self.spent
        clock = (f"{minutes(left)} of the {format_duration(self.budget_s)} budget left" if left >= 0
                 else f"{minutes(-left)} over the {format_duration(self.budget_s)} budget")
        self.say(f"[{index}/{len(stage_names())}] {name}: {what} ({clock})")

    def _outputs_exist(self, name: str) -> bool:
        kind, _, rest = name.partition("-")
        if kind == "phantoms":
            return (self.out / "phantoms" / "manifest.json").is_file()
        if kind == "plan":
            return (self.out / PLAN_FILE).is_file()
        if kind == "train":
            return (self.out / "runs" / rest / "generator.keras").is_file()
        if kind == "predict":
            case, method = rest.rsplit("-", 1)
            return any((self.out / "predictions" / case / method).glob("*_mean.nii.gz"))
        if kind == "evaluate":
            return (self.out / "evaluation" / rest / "metrics.json").is_file()
        return (self.out / REPORT_FILE).is_file()

    # -- the whole run --

    def run(self) -> ReproduceResult:
        resuming = check_out_dir(self.out, self.settings, self.budget_s)
        plan_done = resuming and self.stages.get("plan") is not None
        if not plan_done:
            check_budget(self.budget_s, self.settings)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / SETTINGS_FILE, json.dumps(
            {"format": 1, "settings": dataclasses.asdict(self.settings)}, indent=2) + "\n")
        self.machine = machine()
        self.say(f"reproduce: {self.settings.flags()} --budget {format_duration(self.budget_s)} into {self.out}"
                 + (" (resuming)" if resuming else ""))
        self.say(f"machine: {describe_machine(self.machine)}")

        skipped: list[str] = []
        redo = False
        for index, name in enumerate(stage_names(), start=1):
            marker = None if redo else self.stages.get(name)
            if marker is not None and self._outputs_exist(name):
                skipped.append(name)
                self.carried += float(marker.get("seconds", 0.0))
                continue
            if not redo:
                self.stages.clear_from(name)
                redo = True
            began = time.perf_counter()
            info = self._run_stage(index, name) or {}
            self.stages.mark(name, {"stage": name, "seconds": time.perf_counter() - began,
                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info})
        if skipped:
            self.say(f"skipped {len(skipped)} finished stage(s): {', '.join(skipped)}")
        mhum = {case: self._metrics(case)["mhum"] for case in CASES}
        return ReproduceResult(out_dir=self.out, report=self.out / REPORT_FILE, mhum=mhum,
                               seconds=time.perf_counter() - self.start, skipped=skipped)

    def _run_stage(self, index: int, name: str) -> dict | None:
        kind, _, rest = name.partition("-")
        if kind == "phantoms":
            return self._phantoms(index, name)
        if kind == "plan":
            return self._plan(index, name)
        if kind == "train":
            return self._train(index, name, rest)
        if kind == "predict":
            case, method = rest.rsplit("-", 1)
            return self._predict(index, name, case, method)
        if kind == "evaluate":
            return self._evaluate(index, name, rest)
        return self._report(index, name)

    # -- stages --

    def _phantoms(self, index: int, name: str) -> dict:
        spec = self.preset.phantom_spec(self.settings.size)
        n = self.preset.subjects
        self._announce(index, name, f"{n} + {n} unpaired {spec.name} subjects and the paired test subject under "
                                    f"its own and the held-out ({HELD_OUT_PROFILE}) scanner profile")
        write_phantoms(self.out / "phantoms", n, self.settings.seed, size=spec, overwrite=True,
                       test_profiles="held-out", progress=lambda m: self.say(f"    {m}"))
        return {}

    def _plan(self, index: int, name: str) -> dict:
        inputs = _phantom_inputs(self.out / "phantoms")
        self._announce(index, name, f"warm-up: {self.preset.warmup_steps} timed training steps per method and "
                                    "one timed test slice")
        truth = open_volume(inputs.truth)
        slice_shape = (truth.shape[0], truth.shape[1])
        n_slices = truth.shape[2]
        measured = {m: self._warm_up(m, inputs, slice_shape) for m in METHODS}
        io_s = self._time_writing(truth.shape)
        predict_s = len(CASES) * sum(
            (m.predict_first_s + (n_slices - 1) * m.predict_slice_s) * PREDICT_SAFETY + 2 * io_s
            for m in measured.values())
        ref = self.preset.reference[self.settings.size]
        speed = min(4.0, max(0.5, measured["cyclegan"].step_s / ref.step["cyclegan"]))
        evaluate_s = len(CASES) * ref.evaluate * speed
        p = self.preset
        plan = split_budget(self.budget_s, self.spent, predict_s, evaluate_s, measured, p.min_steps, p.epoch_steps,
                            p.max_epochs, p.max_steps)
        atomic_write_text(self.out / PLAN_FILE, json.dumps(
            {**plan.to_dict(), "machine_speed_vs_reference": speed, "write_volume_s": io_s,
             "rule": "equal training time per method after the margin, prediction and evaluation"}, indent=2) + "\n")
        for m in plan.methods.values():
            self.say(f"    {LABELS[m.method]:<9} {m.step_s:.3f} s/step -> {m.steps} steps ({m.epochs} x "
                     f"{m.steps_per_epoch}), {minutes(m.planned_s)} of a {minutes(plan.share_s)} share")
        self.say(f"    prediction about {minutes(plan.predict_s)}, evaluation about {minutes(plan.evaluate_s)}, "
                 f"margin {minutes(plan.margin_s)}")
        return {}

    def _warm_up(self, method: str, inputs: _Inputs, slice_shape: tuple[int, int]) -> MethodPlan:
        """Time the method's training steps on the real data (the first, which traces, apart), a checkpoint,
        the generator's file and the TensorBoard panel, and the posterior of one test slice."""
        import keras
        import tensorflow as tf

        from .models.artifact import save_generator
        from .models.cyclegan import float32_generator
        from .training.checkpoints import CheckpointRing
        from .training.methods import build_method, method_data

        steps = self.preset.warmup_steps + 1
        cfg = _train_config(self.preset, method, self.settings.seed, steps, 1)
        start = time.perf_counter()
        data = method_data(cfg, inputs.lr_dir, inputs.hr_dir, n_val=cfg.train.n_val_patches)
        keras.utils.set_random_seed(cfg.train.seed)
        setup = build_method(cfg, steps, data.factors)
        timer = _step_timer()
        setup.model.fit(data.dataset(cfg.train.batch_size), epochs=1, steps_per_epoch=steps, callbacks=[timer],
                        shuffle=False, verbose=0)
        step_s = float(np.mean(timer.durations[1:]))
        setup_s = time.perf_counter() - start - step_s * (steps - 1)

        scratch = Path(tempfile.mkdtemp(prefix=".warm-up-", dir=self.out))
        try:
            ring = CheckpointRing(tf.train.Checkpoint(**setup.checkpoint_objects), scratch, 1)
            ring.save(1)  # the first save creates the files
            began = time.perf_counter()
            ring.save(2)
            checkpoint_s = time.perf_counter() - began
            generator = float32_generator(setup.generator)
            began = time.perf_counter()
            save_generator(generator, scratch / "generator.keras", {})
            setup.panel(setup.model, data.val_lr, data.val_hr, cfg.train.mc_samples_val)
            epoch_s = checkpoint_s + time.perf_counter() - began
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        first_s, slice_s = _time_posterior(generator, slice_shape, self.settings.samples)
        del setup, data, generator
        _clear_keras()
        self.say(f"    {LABELS[method]}: {step_s:.3f} s/step, set-up and tracing {setup_s:.1f} s, checkpoint "
                 f"{checkpoint_s:.2f} s, per epoch {epoch_s:.2f} s, {slice_s:.2f} s per test slice")
        return MethodPlan(method=method, step_s=step_s, setup_s=setup_s, checkpoint_s=checkpoint_s, epoch_s=epoch_s,
                          checkpoint_every=cfg.train.checkpoint_every, predict_first_s=first_s,
                          predict_slice_s=slice_s)

    def _time_writing(self, shape: tuple[int, ...]) -> float:
        """Seconds to write one float32 output volume of ``shape`` (gzip-compressed NIfTI)."""
        scratch = Path(tempfile.mkdtemp(prefix=".write-timing-", dir=self.out))
        try:
            values = np.random.default_rng(0).random(shape, dtype=np.float32)
            start = time.perf_counter()
            write_volume(scratch / "timing.nii.gz", values, np.eye(4))
            return time.perf_counter() - start
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _read_plan(self) -> Plan:
        raw = _read_json(self.out / PLAN_FILE, "a reproduce plan")
        return Plan.from_dict({k: raw[k] for k in (f.name for f in dataclasses.fields(Plan))})

    def _train(self, index: int, name: str, method: str) -> dict:
        from .training.trainer import latest_checkpoint, train

        plan = self._read_plan().methods[method]
        inputs = _phantom_inputs(self.out / "phantoms")
        run_dir = self.out / "runs" / method
        resume = run_dir.is_dir() and latest_checkpoint(run_dir) is not None
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # killed before its first checkpoint: start over
        self._announce(index, name, f"{plan.steps} steps ({plan.epochs} epochs of {plan.steps_per_epoch}), planned "
                                    f"{minutes(plan.planned_s)}" + (", resuming from its last checkpoint" if resume else ""))
        cfg = _train_config(self.preset, method, self.settings.seed, plan.steps_per_epoch, plan.epochs)
        result = train(cfg, inputs.lr_dir, inputs.hr_dir, run_dir, resume=resume, progress=self.show_training)
        _clear_keras()
        last = result.history[-1] if result.history else {}
        self.say(f"    trained {result.steps} steps -> {result.generator_path}")
        return {"steps": result.steps, "epochs": result.epochs, "resumed": resume,
                "last_epoch": {k: v for k, v in last.items() if isinstance(v, (int, float))}}

    def _predict(self, index: int, name: str, case: str, method: str) -> dict:
        from .export import load_model
        from .inference.predict import predict_volume

        inputs = _phantom_inputs(self.out / "phantoms")
        out = self.out / "predictions" / case / method
        if out.exists():
            shutil.rmtree(out)  # an interrupted prediction's temporaries
        generator, meta = load_model(self.out / "runs" / method)
        samples = self.settings.samples
        what = (f"{LABELS[method]} on the {case} scan ({inputs.profiles[case]}), "
                + ("one pass (deterministic)" if meta.get("deterministic") else f"T = {samples}"))
        self._announce(index, name, what)
        last = [time.perf_counter()]

        def progress(done: int, total: int, elapsed: float) -> None:
            if done == total or time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                self.say(f"    {done}/{total} slices, {elapsed:.0f} s")

        result = predict_volume(inputs.cases[case], generator, meta, out, samples=samples, seed=self.settings.seed,
                                progress=progress)
        del generator
        _clear_keras()
        return {"seconds_predict": result.seconds, "samples": samples, "deterministic": bool(meta.get("deterministic"))}

    def _evaluate(self, index: int, name: str, case: str) -> dict:
        from .evaluation import Settings, plan_evaluation, run_and_write
        from .evaluation.evaluate import stale_report_folders

        inputs = _phantom_inputs(self.out / "phantoms")
        out = self.out / "evaluation" / case
        for stale in stale_report_folders(out):
            shutil.rmtree(stale, ignore_errors=True)  # an interrupted evaluation of this folder
        self._announce(index, name, f"every method on the {case} scan ({inputs.profiles[case]}) against bicubic, "
                                    "the paired micro-CT and the HR set")
        predictions = {m: self.out / "predictions" / case / m for m in METHODS}
        plan = plan_evaluation(inputs.cases[case], inputs.hr_dir, predictions, out, paired_hr=inputs.truth,
                               model=self.out / "runs" / "cyclegan", overwrite=True)
        say = _throttled(self.say)
        run_and_write(plan, Settings(seed=self.settings.seed), progress=lambda m: say(f"    {m}"))
        return {}

    def _metrics(self, case: str) -> dict[str, dict[str, float]]:
        """``{column key: {row name: value}}`` from a case's ``metrics.json``."""
        raw = _read_json(self.out / "evaluation" / case / "metrics.json", "an evaluation's metrics")
        table: dict[str, dict[str, float]] = {}
        for row in raw["rows"]:
            for key, value in row["values"].items():
                table.setdefault(key, {})[row["method"]] = math.nan if value is None else float(value)
        return table

    def _report(self, index: int, name: str) -> dict:
        self._announce(index, name, f"writing {REPORT_FILE}")
        inputs = _phantom_inputs(self.out / "phantoms")
        evaluations = {case: _read_json(self.out / "evaluation" / case / "metrics.json", "an evaluation's metrics")
                       for case in CASES}
        plan = self._read_plan()
        markers = {n: self.stages.get(n) or {} for n in stage_names()}
        text = render_report(self.settings, self.budget_s, plan, evaluations, inputs.profiles, markers,
                             self.machine, spent_s=self.spent)
        atomic_write_text(self.out / REPORT_FILE, text)
        return {}


def reproduce(out_dir: str | os.PathLike, budget: str | float, size: str | None = None, seed: int = 0,
              samples: int = 100, preset: str = "cpu", say: Say | None = None,
              show_training: bool = False) -> ReproduceResult:
    """Run (or resume) the whole experiment into ``out_dir`` (see the module doc); ``budget`` is a duration
    string (``45m``) or seconds. Bad options, a foreign folder and a budget too small are refused with one
    line before anything is written."""
    budget_s = parse_budget(budget) if isinstance(budget, str) else float(budget)
    if not math.isfinite(budget_s) or budget_s <= 0:
        raise ConfigError(f"--budget must be longer than zero, got {budget!r}")
    settings = resolve_settings(size, seed, samples, preset)
    return Reproduction(out_dir, budget_s, settings, say=say, show_training=show_training).run()


# ----- the report ---------------------------------------------------------------------------------------


def compare(mine: float, other: float, direction: str, digits: int) -> str | None:
    """``better``, ``worse`` or ``tie`` (equal at the printed precision) for a column's direction
    (``↑``, ``↓``, ``→1``); None when either value is missing or the column is no score."""
    if direction not in ("↑", "↓", "→1") or not (math.isfinite(mine) and math.isfinite(other)):
        return None
    if direction == "→1":
        a, b = round(abs(mine - 1), digits), round(abs(other - 1), digits)
        lower_is_better = True
    else:
        a, b = round(mine, digits), round(other, digits)
        lower_is_better = direction == "↓"
    if a == b:
        return "tie"
    return "better" if (a < b) == lower_is_better else "worse"


_SYMBOL = {"better": "✔ better", "worse": "✘ worse", "tie": "= tie", None: "—"}


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def _digits(key: str) -> int:
    from .evaluation.columns import BY_KEY

    return BY_KEY[key].digits if key in BY_KEY else 3


def render_report(settings: RunSettings, budget_s: float, plan: Plan, evaluations: Mapping[str, Mapping[str, Any]],
                  profiles: Mapping[str, str], markers: Mapping[str, Mapping[str, Any]], machine_info: Mapping[str, Any],
                  spent_s: float) -> str:
    """``report.md``: the Table-2 headline, the CycleGAN against each other row metric by metric, training,
    the full metric tables with links to each case's evaluation report, and the budget."""
    case_title = {c: f"{'own' if c == 'own' else 'held-out'} scanner ({profiles[c]})" for c in CASES}
    rows_of = {c: {r["method"]: r for r in evaluations[c]["rows"]} for c in CASES}
    columns = {c: evaluations[c]["columns"] for c in CASES}
    lines = [
        "# Table 2 of Li et al. (ISBI 2021), reproduced on phantoms", "",
        f"`microsr-tf reproduce --out DIR --budget {format_duration(budget_s)} {settings.flags()}`", "",
        f"- **machine**: {describe_machine(machine_info)}",
        f"- **time**: {minutes(spent_s)} of the {format_duration(budget_s)} budget (all invocations on this folder; "
        "time lost to an interrupted stage is not counted)",
        f"- **data**: phantoms (`phantoms/`, seed {settings.seed}): "
        f"{PRESETS[settings.preset].subjects} + {PRESETS[settings.preset].subjects} unpaired training subjects; "
        "the paired test subject predicted under its own scanner profile and under the held-out "
        f"`{HELD_OUT_PROFILE}` profile no method saw in training",
        f"- **methods**: the CycleGAN (T = {settings.samples} Monte Carlo samples) and the supervised U-Net and "
        "SRGAN (deterministic: one pass, zero variance), each trained for the same time; bicubic upsampling as "
        "a floor", "",
        "## m-HuM ↓ (the paper's Table 2)", "",
        "| method | paper (real scans) | " + " | ".join(case_title[c] for c in CASES) + " |",
        "|---|---:|" + "---:|" * len(CASES),
    ]
    names = list(dict.fromkeys(n for c in CASES for n in rows_of[c]))
    order = [n for n in ("bicubic", "unet", "srgan", "cyclegan") if n in names] + [n for n in names if n not in
                                                                                   ("bicubic", *METHODS)]
    for n in order:
        reference = any(rows_of[c].get(n, {}).get("kind") == "reference" for c in CASES)
        label = f"*{n}* (reference)" if reference else f"**{LABELS.get(n, n)}**"
        paper = f"{PAPER_MHUM[n]:.2f}" if n in PAPER_MHUM else "—"
        cells = [_fmt(rows_of[c].get(n, {}).get("values", {}).get("mhum"), 3) for c in CASES]
        lines.append(f"| {label} | {paper} | " + " | ".join(cells) + " |")
    lines += ["", "The paper's values come from real cone-beam CT and micro-CT of another dataset: compare the "
                  "order of the methods, not the numbers. Lower is better; m-HuM only asks that each output slice "
                  "resemble *some* micro-CT slice in shape, so the paired columns below are the stricter test.", ""]

    lines += ["## Does the CycleGAN beat bicubic and each baseline?", "",
              "Metric by metric, at the precision printed in the tables (✔ the CycleGAN is better, ✘ worse, "
              "= equal; — not applicable).", ""]
    opponents = [n for n in ("bicubic", "unet", "srgan") if n in names]
    for c in CASES:
        mine = rows_of[c].get("cyclegan", {}).get("values", {})
        lines += [f"**{case_title[c]}**", "",
                  "| metric | " + " | ".join(f"vs {LABELS.get(o, o)}" for o in opponents) + " |",
                  "|---|" + "---|" * len(opponents)]
        for col in columns[c]:
            if col["direction"] not in ("↑", "↓", "→1"):
                continue
            key, digits = col["key"], _digits(col["key"])
            value = mine.get(key)
            if value is None:
                continue
            cells, verdicts = [], []
            for o in opponents:
                theirs = rows_of[c][o]["values"].get(key)
                verdict = compare(float(value), math.nan if theirs is None else float(theirs), col["direction"],
                                  digits)
                verdicts.append(verdict)
                cells.append(_SYMBOL[verdict] + ("" if verdict is None else f" ({_fmt(value, digits)} vs "
                                                                             f"{_fmt(theirs, digits)})"))
            if any(v is not None for v in verdicts):
                lines.append(f"| {col['heading']} {col['direction']} | " + " | ".join(cells) + " |")
        if mine.get("unc_ause") is not None:
            unc = {k: _fmt(None if mine.get(k) is None else float(mine[k]), _digits(k))
                   for k in ("unc_spearman", "unc_ause", "unc_ause_random", "unc_ratio")}
            lines += ["", f"Uncertainty, the CycleGAN's alone (the baselines are deterministic): Spearman ρ between "
                          f"predicted std and error {unc['unc_spearman']}, AUSE {unc['unc_ause']} (a random ordering: "
                          f"{unc['unc_ause_random']}), RMSE/std {unc['unc_ratio']}."]
        lines.append("")

    lines += ["## Training", "",
              "Recipes: `microsr_tf/presets/" + ("tiny/" if settings.preset == "tiny" else "")
              + "{cyclegan,unet,srgan}.yaml` (the package's `" + settings.preset + "` preset); each run's resolved "
              "config is `runs/METHOD/config.yaml`, its TensorBoard logs `runs/METHOD/logs/`.", "",
              "| method | steps (epochs × steps) | s/step (warm-up) | planned | took | last epoch's losses |",
              "|---|---:|---:|---:|---:|---|"]
    for m in METHODS:
        p = plan.methods[m]
        mk = markers.get(f"train-{m}", {})
        losses = ", ".join(f"{k} {v:.4f}" for k, v in mk.get("last_epoch", {}).items() if k not in ("epoch", "step"))
        lines.append(f"| {LABELS[m]} | {p.steps} ({p.epochs} × {p.steps_per_epoch}) | {p.step_s:.3f} | "
                     f"{minutes(p.planned_s)} | {minutes(float(mk.get('seconds', math.nan)))} | {losses or '—'} |")
    lines.append("")

    for c in CASES:
        cols = columns[c]
        lines += [f"## Full metrics: {case_title[c]}", "",
                  f"Per-case evaluation report with every column explained, montages and uncertainty plots: "
                  f"[evaluation/{c}/report.md](evaluation/{c}/report.md).", "",
                  "| method | " + " | ".join(f"{col['heading']} {col['direction']}" for col in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for r in evaluations[c]["rows"]:
            label = f"*{r['method']}* (reference)" if r["kind"] == "reference" else f"**{LABELS.get(r['method'], r['method'])}**"
            cells = [_fmt(None if r["values"].get(col["key"]) is None else float(r["values"][col["key"]]),
                          _digits(col["key"])) for col in cols]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Budget", "",
              f"Rule: of the {format_duration(budget_s)} budget, {MARGIN:.0%} is kept as a margin; after the phantoms "
              "and a warm-up (a few timed training steps per method on the real data and one timed test slice), "
              "the estimated prediction and evaluation time is set aside and the rest is split equally between "
              "the three methods; each trains as many steps as its share holds at its measured speed.", "",
              "| stage | planned | took |", "|---|---:|---:|"]
    planned = {"predict": plan.predict_s, "evaluate": plan.evaluate_s}
    groups: dict[str, float] = {}
    for n in stage_names():
        kind = n.split("-")[0]
        groups[kind] = groups.get(kind, 0.0) + float(markers.get(n, {}).get("seconds", 0.0))
    lines.append(f"| phantoms + warm-up | {minutes(plan.spent_s)} (measured) | "
                 f"{minutes(groups['phantoms'] + groups['plan'])} |")
    for m in METHODS:
        lines.append(f"| train {LABELS[m]} | {minutes(plan.methods[m].planned_s)} | "
                     f"{minutes(float(markers.get(f'train-{m}', {}).get('seconds', 0.0)))} |")
    lines.append(f"| predict | {minutes(planned['predict'])} | {minutes(groups['predict'])} |")
    lines.append(f"| evaluate | {minutes(planned['evaluate'])} | {minutes(groups['evaluate'])} |")
    lines.append(f"| margin | {minutes(plan.margin_s)} | — |")
    lines.append("")
    return "\n".join(lines)
