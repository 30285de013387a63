"""Train the CycleGAN, or a supervised baseline (``model.method``), into a run directory: the
library side of ``microsr-tf train``. What differs between methods comes from
:mod:`microsr_tf.training.methods`; the run itself is the same.

Layout of ``RUN_DIR``::

    config.yaml            the resolved configuration of the run, data folders included (absolute)
    logs/                  TensorBoard: step and epoch losses, learning rate, image panels
    checkpoints/           full training state: weights, optimizers (step counter, learning-rate
                           schedule), best loss, image pools, and the run's fixed facts (seeds actually
                           used, steps per epoch, patch counts, the settings a resume must keep, the
                           data's intensity statistics)
    generator.keras        G_L (or the baseline's generator) at the end of training (+
                           generator.meta.json), float32 whatever train.precision was
    generator_best.keras   the generator after the epoch with the lowest mean cycle loss (baselines:
                           pixel loss) (+ .meta.json)

Resume is exact: every random draw of a step is a function of the seed and the step counter (see
:mod:`microsr_tf.models.cyclegan`; the baselines draw nothing) and the batch stream is a function of
the seed and the position (see :func:`microsr_tf.pipeline.positioned_patches`; the baselines' noise is
drawn per batch index), so a run killed and resumed from its
checkpoint at step k reaches the weights a straight run reaches, to float rounding. Settings that
would change that trajectory are refused by name on resume; those in :data:`RESUME_MAY_CHANGE` are
allowed.

Everything that can be checked is checked before ``RUN_DIR`` is created, and a run that fails
before its first checkpoint removes the directory it created.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml

from microsr_tf.config import MAX_SEED, Config
from microsr_tf.degradation import PairedData
from microsr_tf.errors import ConfigError, InputError, MicrosrError
from microsr_tf.files import check_outside
from microsr_tf.models.artifact import save_generator
from microsr_tf.models.cyclegan import float32_generator
from microsr_tf.pipeline import TrainingData
from microsr_tf.training.callbacks import (CheckpointSaver, EpochMeanState, ProgressBar, TensorBoardLogger,
                                          summary_writer)
from microsr_tf.training.checkpoints import CheckpointRing
from microsr_tf.training.methods import build_method, is_deterministic, method_data
from microsr_tf.training.multiworker import custom_loop
from microsr_tf.training.strategy import WorkerDir, check_batch_size, is_chief, is_multiworker, make_strategy
from microsr_tf.volumes import make_output_dir

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
GENERATOR_FILE = "generator.keras"
BEST_GENERATOR_FILE = "generator_best.keras"
KEEP_CHECKPOINTS = 3

# Settings a resumed run may change. They leave the weights a straight run would reach unchanged,
# except that precision changes the arithmetic of later steps and strategy the summation order (and,
# with an image pool, each replica's pool restarts from the first replica's).
RESUME_MAY_CHANGE = frozenset({
    "data.lr_dir", "data.hr_dir", "data.shards_dir",  # the data may move; its patch counts are checked
    "data.seed", "train.seed",  # null means "the seed this run drew"; an int must equal it
    "train.epochs",  # refused once the learning rate has started its decay towards the last epoch
    "train.strategy", "train.precision", "train.checkpoint_every", "train.log_every", "train.image_every",
    "train.n_val_patches", "train.mc_samples_val",
})
RUN_FACTS = ("train_seed", "data_seed", "steps_per_epoch", "lr_patches", "hr_patches")
STATS_RTOL = 1e-6  # the same files give the same statistics; this only absorbs summation order


class TrainingDiverged(MicrosrError):
    """A loss became NaN or infinite; the run stopped at its last good checkpoint."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    generator_path: Path
    best_generator_path: Path | None
    steps: int  # global step reached (optimizer iterations)
    epochs: int
    history: list[dict[str, float]]  # epoch means of this invocation: {"epoch", "step", "<loss>": ...}
    best_cycle_loss: float  # lowest epoch-mean cycle loss (baselines: pixel loss)
    seeds: dict[str, int] = dataclasses.field(default_factory=dict)  # {"train", "data"}: drawn where null


class RunFacts(tf.Module):
    """What is fixed at the start of a run and kept in every checkpoint (:data:`RUN_FACTS`): the seeds
    actually used, steps per epoch and the two patch counts. A resume checks the data against them."""

    def __init__(self, **values: int):
        super().__init__(name="run_facts")
        for name in RUN_FACTS:
            setattr(self, name, tf.Variable(int(values.get(name, -1)), dtype=tf.int64, trainable=False, name=name))

    def values(self) -> dict[str, int]:
        return {name: int(getattr(self, name).numpy()) for name in RUN_FACTS}


class RunSettings(tf.Module):
    """The settings that fix a run's course (all but :data:`RESUME_MAY_CHANGE`) and its data's intensity
    statistics, as JSON, kept in every checkpoint: a resume checks them against the checkpoint itself,
    since ``config.yaml`` is a text file that can be edited. Checkpoints written without it resume unchecked."""

    def __init__(self, text: str = ""):
        super().__init__(name="run_settings")
        self.text = tf.Variable(text, dtype=tf.string, trainable=False, name="text")


def course_settings(cfg: Config) -> dict[str, object]:
    """``{"section.field": value}`` of every setting a resume must keep, as JSON values."""
    return {key: json.loads(json.dumps(value)) for key, value in _settings(cfg).items() if key not in RESUME_MAY_CHANGE}


def _settings(cfg: Config) -> dict[str, object]:
    return {f"{section}.{f.name}": getattr(getattr(cfg, section), f.name)
            for section in ("data", "model", "train") for f in dataclasses.fields(getattr(cfg, section))}


def data_statistics(data: TrainingData | PairedData) -> dict[str, dict[str, float] | None]:
    """The intensity statistics of a run's data: another set of scans with the same patch counts differs here."""
    return {"hr_stats": data.hr_stats.to_dict(), "lr_stats": None if data.lr_stats is None else data.lr_stats.to_dict()}


def read_run_settings(path: str) -> dict | None:
    """The :class:`RunSettings` stored in checkpoint ``path`` (``{"settings": ..., "data": ...}``), or None
    for a checkpoint written without them."""
    settings = RunSettings()
    try:
        tf.train.Checkpoint(run_settings=settings).restore(path).expect_partial()
        text = settings.text.numpy().decode("utf-8")
        return json.loads(text) if text else None
    except (tf.errors.OpError, ValueError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read this checkpoint's settings ({first})") from None


def read_run_facts(path: str) -> dict[str, int]:
    """The :class:`RunFacts` stored in checkpoint ``path``."""
    facts = RunFacts()
    try:
        status = tf.train.Checkpoint(run_facts=facts).restore(path)
        status.assert_existing_objects_matched().expect_partial()  # the rest of the run is not read here
    except (tf.errors.OpError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read this checkpoint ({first})") from None
    except AssertionError:
        raise InputError(path, "this checkpoint does not record its run's seeds and data (written by an older "
                               "microsr-tf); it cannot be resumed exactly, start a new run") from None
    return facts.values()


def latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """Prefix of the newest checkpoint in ``run_dir``, or None when it has no checkpoint state file.

    InputError, naming the file, when that state file cannot be read or names a checkpoint whose files
    are gone: resuming must not quietly start the run over and overwrite the checkpoints it does have.
    """
    directory = os.path.join(os.fspath(run_dir), CHECKPOINT_DIR)
    state_file = os.path.join(directory, "checkpoint")
    if not os.path.exists(state_file):
        return None
    no_name = ("names no checkpoint; write the newest one into it (model_checkpoint_path: \"ckpt-N\") "
               "or start a new run")
    try:
        with open(state_file, "rb") as fh:
            if not fh.read().strip():
                raise InputError(state_file, no_name)
        state = tf.train.get_checkpoint_state(directory)
    except (ValueError, tf.errors.OpError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(state_file, f"cannot read this checkpoint list ({first})") from None
    if state is None or not state.model_checkpoint_path:
        raise InputError(state_file, no_name)
    path = state.model_checkpoint_path
    if not tf.io.gfile.exists(path + ".index"):
        raise InputError(state_file, f"names {os.path.basename(path)} as the newest checkpoint, but its files are "
                                     "missing; name one that exists in it or start a new run")
    return path


def generator_meta(cfg: Config, data: TrainingData | PairedData) -> dict:
    """Metadata stored beside the generator; the prediction stage reads exactly these keys.

    ``deterministic`` is true when the generator has nothing random (a baseline, or a CycleGAN without
    dropout): its Monte Carlo variance is zero.
    """
    return {
        "format": 1,
        "method": cfg.model.method,
        "deterministic": is_deterministic(cfg.model),
        "hr_spacing": [float(s) for s in data.hr_spacing],
        "lr_spacing": [float(s) for s in data.lr_spacing],
        "factors": [float(f) for f in data.factors],
        "hr_stats": data.hr_stats.to_dict(),
        "lr_stats": None if data.lr_stats is None else data.lr_stats.to_dict(),
        "roi_threshold_lr": cfg.data.roi_threshold_lr,
        "model": dataclasses.asdict(cfg.model),
        "patch_size": cfg.data.patch_size,
        "axis": cfg.data.axis,
    }


def _check_run_dir(cfg: Config, run_dir: Path,
                   resume: bool) -> tuple[Config | None, dict[str, int] | None, dict | None]:
    """A fresh run needs an absent or empty directory; a resumed one its ``config.yaml`` and the same
    settings, but for :data:`RESUME_MAY_CHANGE`, as both that file and the newest checkpoint record them.
    Returns the saved config (on resume), the newest checkpoint's :class:`RunFacts` values (None when a
    run was stopped before its first checkpoint: it starts again from step 0) and its
    :class:`RunSettings` (None where it has none)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "exists and is not a directory; choose a run directory")
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(run_dir, "is not empty; pass --resume to continue its run or choose a new directory")
        return None, None, None
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise InputError(run_dir, "has no checkpoint to resume from" if latest_checkpoint(run_dir) is None
                         else f"has checkpoints but no {CONFIG_FILE}; cannot check the resumed run's settings")
    saved = Config.load(saved_path)
    _check_complete(saved_path)
    old_settings, new_settings = _settings(saved), _settings(cfg)
    for key, new in new_settings.items():
        old = old_settings[key]
        if key not in RESUME_MAY_CHANGE and old != new:
            raise ConfigError(f"{saved_path}: {key} was {old!r} in this run and is {new!r} now; that changes "
                              f"what the resumed steps compute, so keep {old!r} or start a new run")
    if (saved.data.shards_dir is None) != (cfg.data.shards_dir is None):
        raise ConfigError(f"{saved_path}: data.shards_dir was {saved.data.shards_dir!r} in this run and is "
                          f"{cfg.data.shards_dir!r} now; shards and NIfTI folders stream the patches in different "
                          "orders, so keep the run's source or start a new run")
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return saved, None, None
    facts = read_run_facts(latest)
    recorded = read_run_settings(latest)
    if recorded is not None:
        for key, new in course_settings(cfg).items():
            if key in recorded["settings"] and recorded["settings"][key] != new:
                old = recorded["settings"][key]
                raise ConfigError(f"{latest}: {key} was {old!r} when this run wrote this checkpoint and is {new!r} "
                                  f"now ({CONFIG_FILE} was edited?); that changes what the resumed steps compute, "
                                  f"so keep {old!r} or start a new run")
    for name in ("train", "data"):
        asked, used = getattr(cfg, name).seed, facts[f"{name}_seed"]
        if asked is not None and asked != used:
            raise ConfigError(f"{saved_path}: {name}.seed is {asked} now but this run used {used}; keep it "
                              "(or null) or start a new run")
    return saved, facts, recorded


def _check_complete(path: Path) -> None:
    """A run's ``config.yaml`` holds the data, model and train sections it was written with; one that
    lacks them (emptied, cut short) would quietly resume with defaults in their place."""
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    missing = [s for s in ("data", "model", "train") if not isinstance(raw, dict) or not isinstance(raw.get(s), dict)]
    if missing:
        raise InputError(path, f"has no {'/'.join(missing)} section{'s' if len(missing) > 1 else ''}, which every "
                               "run writes; restore this run's config.yaml or start a new run")


def _resolve_seeds(cfg: Config, facts: dict[str, int] | None) -> dict[str, int]:
    """The run's seeds: restored on resume, else the config's, drawn where it has null."""
    if facts is not None:
        return {"train": facts["train_seed"], "data": facts["data_seed"]}
    draw = np.random.SeedSequence().generate_state(2)
    return {name: int(draw[i] % (MAX_SEED + 1)) if getattr(cfg, name).seed is None else getattr(cfg, name).seed
            for i, name in enumerate(("train", "data"))}


def _with_data_folders(cfg: Config, lr_dir, hr_dir) -> Config:
    """``cfg`` with the data folders given as arguments (else its own) made absolute, so that the
    saved ``config.yaml`` finds them again from any working directory."""
    absolute = lambda p: None if p is None else os.path.abspath(os.fspath(p))  # noqa: E731
    d = cfg.data
    data = dataclasses.replace(d, lr_dir=absolute(lr_dir if lr_dir is not None else d.lr_dir),
                               hr_dir=absolute(hr_dir if hr_dir is not None else d.hr_dir),
                               shards_dir=absolute(d.shards_dir))
    return dataclasses.replace(cfg, data=data)


def _check_data(run_dir: Path, facts: dict[str, int], now: dict[str, int], recorded: dict | None,
                stats: dict[str, dict[str, float] | None]) -> None:
    """On resume the data must give the steps per epoch, patch counts and (where the checkpoint records
    them) intensity statistics the run was trained with."""
    what = {"steps_per_epoch": "steps per epoch", "lr_patches": "LR patches", "hr_patches": "HR patches"}
    found = [(f"{now[name]} {label}", facts[name]) for name, label in what.items() if facts[name] != now[name]]
    for name, label in (("hr_stats", "HR"), ("lr_stats", "LR")):
        was, new = (recorded or {}).get("data", {}).get(name), stats[name]
        if was is not None and new is not None and not all(math.isclose(was[k], new[k], rel_tol=STATS_RTOL,
                                                                         abs_tol=1e-12) for k in was):
            found.append((f"{label} intensities of mean {new['mean']:.6g}", f"a mean of {was['mean']:.6g}"))
    if found:
        given, then = found[0]
        raise ConfigError(f"{run_dir / CONFIG_FILE}: the data now give {given}, but this run was trained with "
                          f"{then}; point --lr-dir/--hr-dir (or data.shards_dir) at the run's data, or start a new run")


def _check_epochs(saved_epochs: int | None, cfg: Config, done: int, steps_per_epoch: int, run_dir: Path) -> None:
    """More (or fewer) epochs are fine unless the learning rate has begun its decay towards the last one;
    fewer than the run has already done are refused."""
    tc = cfg.train
    if done > tc.epochs * steps_per_epoch:
        trained = done / steps_per_epoch
        raise ConfigError(f"{run_dir / CONFIG_FILE}: train.epochs {tc.epochs} is fewer than the {trained:g} epochs "
                          f"this run has already trained; give at least {math.ceil(trained)}")
    decay = tc.decay_start_epoch
    if saved_epochs is None or saved_epochs == tc.epochs or decay is None or done <= decay * steps_per_epoch:
        return
    raise ConfigError(f"{run_dir / CONFIG_FILE}: train.epochs was {saved_epochs} in this run and is {tc.epochs} "
                      f"now, but the learning rate has been decaying towards epoch {saved_epochs} since epoch "
                      f"{decay}; changing the end now would bend that schedule, so keep {saved_epochs}")


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restore every object of this run from ``path``; a checkpoint of another setup is an error."""
    try:
        status = checkpoint.restore(path)
    except (tf.errors.OpError, ValueError, IndexError) as exc:  # truncated or foreign checkpoint files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read this checkpoint ({first})") from None
    try:
        status.assert_existing_objects_matched().expect_partial()  # the epoch means are restored on their own
    except AssertionError as exc:
        raise ConfigError(f"{path}: does not match this run's model ({str(exc).splitlines()[0]})") from None


def _fit(model: keras.Model, dataset_from, epochs: int, steps_per_epoch: int, callbacks: list) -> None:
    """``fit`` from the model's current step; a resumed run first finishes its interrupted epoch.

    ``dataset_from(step)`` is the batch stream from global step ``step`` on: each ``fit`` call gets
    the stream where the previous one stopped.
    """
    done = int(model.optimizer.iterations.numpy())
    epoch, offset = divmod(done, steps_per_epoch)
    if offset and epoch < epochs:
        model.fit(dataset_from(done), epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps_per_epoch - offset,
                  callbacks=callbacks, shuffle=False, verbose=0)
        epoch += 1
        if model.stop_training:
            return
    if epoch < epochs:
        model.fit(dataset_from(int(model.optimizer.iterations.numpy())), epochs=epochs, initial_epoch=epoch,
                  steps_per_epoch=steps_per_epoch, callbacks=callbacks, shuffle=False, verbose=0)


def train(cfg: Config, lr_dir: str | os.PathLike | None, hr_dir: str | os.PathLike | None,
          run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg.model.method`` on the LR and HR folders into ``run_dir`` (see the module doc): the
    CycleGAN's G_L/G_H/D_L/D_H on unpaired patches, or a baseline on degraded HR patches.

    ``lr_dir``/``hr_dir`` default to ``cfg.data.lr_dir``/``hr_dir`` (a resumed run finds them in its
    ``config.yaml``). With ``resume`` the run continues exactly from the newest checkpoint in
    ``run_dir`` (from step 0 if it was stopped before its first checkpoint). Raises
    :class:`InputError` / :class:`ConfigError` for user mistakes and :class:`TrainingDiverged` on a
    NaN/Inf loss.
    """
    cfg = _with_data_folders(cfg.validate(), lr_dir, hr_dir)
    tc = cfg.train
    run_dir = Path(run_dir)
    strategy = make_strategy(tc.strategy)
    check_batch_size(tc.batch_size, strategy)
    check_outside(run_dir, (cfg.data.lr_dir, cfg.data.hr_dir, cfg.data.shards_dir))  # before "is not empty"
    saved_cfg, facts, recorded = _check_run_dir(cfg, run_dir, resume)
    if saved_cfg is not None:  # folders not given again: the run's own
        cfg = _with_data_folders(cfg, cfg.data.lr_dir or saved_cfg.data.lr_dir, cfg.data.hr_dir or saved_cfg.data.hr_dir)
        for flag, given, folder, saved in (("--lr-dir", lr_dir, cfg.data.lr_dir, saved_cfg.data.lr_dir),
                                           ("--hr-dir", hr_dir, cfg.data.hr_dir, saved_cfg.data.hr_dir)):
            if given is None and folder is not None and folder == saved and not os.path.isdir(folder):
                raise InputError(folder, f"directory not found: it is this run's data folder in its {CONFIG_FILE}; "
                                         f"if the data moved, give its new place with {flag}")
        check_outside(run_dir, (cfg.data.lr_dir, cfg.data.hr_dir, cfg.data.shards_dir))
    seeds = _resolve_seeds(cfg, facts)
    # the run's own config with the seeds it uses: config.yaml holds them, so that
    # `train --config RUN/config.yaml` repeats the run (cfg itself keeps null seeds as given)
    seeded = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=seeds["data"]),
                                 train=dataclasses.replace(tc, seed=seeds["train"]))
    data = method_data(seeded, cfg.data.lr_dir, cfg.data.hr_dir, n_val=tc.n_val_patches)
    steps_per_epoch = tc.steps_per_epoch or data.steps_per_epoch(tc.batch_size)
    lr_patches, hr_patches = ((data.n_lr_patches, data.n_hr_patches) if isinstance(data, TrainingData)
                              else (0, data.hr.n_patches))
    now = {"train_seed": seeds["train"], "data_seed": seeds["data"], "steps_per_epoch": steps_per_epoch,
           "lr_patches": lr_patches, "hr_patches": hr_patches}
    stats = data_statistics(data)
    if facts is not None:
        _check_data(run_dir, facts, now, recorded, stats)
    keras.utils.set_random_seed(seeds["train"])

    chief = is_chief(strategy)
    created = chief and not run_dir.exists()
    out = WorkerDir(run_dir, chief)
    out_dir = Path(out.path)
    ring = None
    try:
        make_output_dir(out_dir)
        if facts is None:
            seeded.save(out_dir / CONFIG_FILE)
        with strategy.scope():
            setup = build_method(seeded, steps_per_epoch, data.factors)
            model = setup.model
            best_cycle = tf.Variable(math.inf, trainable=False, name="best_cycle_loss")
            epoch_state = EpochMeanState(model.metrics)
        state = dict(best_cycle_loss=best_cycle, run_facts=RunFacts(**now), **setup.checkpoint_objects)
        settings = RunSettings(json.dumps({"settings": course_settings(seeded), "data": stats}, sort_keys=True))
        checkpoint = tf.train.Checkpoint(**state, epoch_means=epoch_state, run_settings=settings)
        ring = CheckpointRing(checkpoint, out_dir / CHECKPOINT_DIR, KEEP_CHECKPOINTS)
        if facts is not None:
            path = latest_checkpoint(run_dir)
            _restore(tf.train.Checkpoint(**state), path)
            # checkpoints written before the epoch means were saved lack them: the epoch then restarts its means
            tf.train.Checkpoint(epoch_means=epoch_state).restore(path).expect_partial()
            _check_epochs(saved_cfg.train.epochs, cfg, int(model.optimizer.iterations.numpy()), steps_per_epoch,
                          run_dir)
            seeded.save(out_dir / CONFIG_FILE)  # once accepted, the run records the settings it continues with

        meta = generator_meta(cfg, data)
        best_path = run_dir / BEST_GENERATOR_FILE
        mid_epoch = facts is not None and int(model.optimizer.iterations.numpy()) % steps_per_epoch != 0
        saver = CheckpointSaver(ring, tc.checkpoint_every, best_cycle, best_key=setup.best_loss,
                                epoch_state=epoch_state, resumed_mid_epoch=mid_epoch,
                                on_best=(lambda: save_generator(float32_generator(setup.generator), best_path, meta))
                                if chief else None)
        callbacks: list[keras.callbacks.Callback] = [saver]
        writer = None
        if chief:
            writer = summary_writer(out_dir / LOG_DIR)
            callbacks.append(TensorBoardLogger(writer, tc.log_every, tc.image_every, data.val_lr, data.val_hr,
                                               tc.mc_samples_val, setup.panel, setup.panel_tag))
            if progress:
                callbacks.append(ProgressBar(tc.epochs, steps_per_epoch, tc.log_every, setup.shown_losses))

        start = int(model.optimizer.iterations.numpy())
        if is_multiworker(strategy):
            custom_loop(model, strategy, lambda ctx: data.dataset(tc.batch_size, ctx, start_step=start), tc.epochs,
                        steps_per_epoch, callbacks)
        else:
            _fit(model, lambda step: data.dataset(tc.batch_size, start_step=step), tc.epochs, steps_per_epoch,
                 callbacks)
        if writer is not None:
            writer.close()

        steps = int(model.optimizer.iterations.numpy())
        if saver.diverged is not None:
            step, name = saver.diverged
            last = latest_checkpoint(out_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise TrainingDiverged(f"{run_dir}: training diverged: {name} became NaN/Inf at step {step}; {kept}")
        generator_path = run_dir / GENERATOR_FILE
        if chief:
            save_generator(float32_generator(setup.generator), generator_path, meta)
        return TrainResult(run_dir=run_dir, generator_path=generator_path,
                           best_generator_path=best_path if best_path.exists() else None, steps=steps,
                           epochs=steps // steps_per_epoch, history=saver.history,
                           best_cycle_loss=float(best_cycle.numpy()), seeds=seeds)
    except BaseException:
        if created and (ring is None or ring.latest_checkpoint is None):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        out.cleanup()
