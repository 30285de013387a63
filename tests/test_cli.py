"""The command group: `--help` without TensorFlow, one set of exit codes for every command, help
defaults read from the config, plain progress lines when output is redirected, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from microsr_tf.cli.main import COMMANDS, cli
from microsr_tf.demo import BUNDLED_MODEL

from exports import older_export  # tests/exports.py

BUNDLED = BUNDLED_MODEL  # the demo's model, in saved_models/


def test_help_of_every_command_does_not_import_tensorflow():
    code = (
        "import sys; from click.testing import CliRunner; from microsr_tf.cli.main import COMMANDS, cli\n"
        "out = [CliRunner().invoke(cli, ['--help']).output]\n"
        "for name in COMMANDS:\n"
        "    r = CliRunner().invoke(cli, [name, '--help']); assert r.exit_code == 0, r.output; out.append(r.output)\n"
        "print('\\n'.join(out)); print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("phantom", "prepare", "train", "predict", "export", "demo"):
        assert name in out
    assert out.strip().splitlines()[-1] == "[]"  # neither was imported
    assert "None" not in out  # no "[x<=None]" of an unbounded range, no "[default: None]"


def test_train_help_shows_the_config_defaults():
    from microsr_tf.config import Config

    text = " ".join(CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output.split())
    cfg = Config()
    for flag, value in [("--epochs", cfg.train.epochs), ("--batch-size", cfg.train.batch_size),
                        ("--lr", cfg.train.learning_rate), ("--ngf", cfg.model.ngf),
                        ("--patch-size", cfg.data.patch_size), ("--checkpoint-every", cfg.train.checkpoint_every)]:
        after = text.split(f" {flag} ", 1)[1]
        assert f"[default: {value}]" in after.split(" --", 1)[0], flag
    prepare = " ".join(CliRunner().invoke(cli, ["prepare", "--help"], terminal_width=200).output.split())
    assert f"[default: {cfg.data.stride}]" in prepare.split("--stride", 1)[1].split(" --", 1)[0]


def test_phantom_size_choices_are_the_phantom_sizes():
    from microsr_tf.cli import phantom
    from microsr_tf.phantoms import SIZES

    size = next(p for p in phantom.command.params if p.name == "size")
    assert list(size.type.choices) == list(SIZES)


# Per command: a mistake click catches while reading the command line (exit 2) and one the command
# itself refuses (exit 1: a missing input file or model, a config file in error).
USAGE = {
    "phantom": ["OUT", "--subjects", "0"],
    "prepare": ["--lr-dir", "a", "--hr-dir", "b", "--out", "c", "--patch-size", "30"],
    "train": ["--lr-dir", "a", "--hr-dir", "b", "--out", "c", "--epochs", "0"],
    "predict": ["x.nii.gz", "--model", "m", "--out-dir", "o", "--samples", "1"],
    "export": ["--model", "m", "--out", "o", "--samples", "1"],
    "demo": ["--samples", "1"],
    "evaluate": ["--lr", "a", "--hr-dir", "b", "--pred", "m=p", "--out", "o", "--hu-distance", "I9"],
    "rating-study": ["make", "--lr", "a", "--method", "m=p", "--out", "o", "--slices", "ten"],
    "reproduce": ["--out", "o", "--budget", "45m", "--samples", "1"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_exit_codes_are_2_for_usage_errors_and_1_for_input_errors(name, tmp_path):
    if name not in USAGE:
        pytest.fail(f"give the new command {name!r} its usage-error and input-error cases here")
    runner = CliRunner()
    assert runner.invoke(cli, [name, "--no-such-option"]).exit_code == 2
    result = runner.invoke(cli, [name, *USAGE[name]])
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output and "Error:" in result.output
    missing = str(tmp_path / "missing")
    given = {  # also one case per command
        "phantom": [str(tmp_path / "file" / "out")],
        "prepare": ["--lr-dir", missing, "--hr-dir", missing, "--out", str(tmp_path / "shards")],
        "train": ["--lr-dir", missing, "--hr-dir", missing, "--out", str(tmp_path / "run"), "--patch-size", "32"],
        "predict": [missing, "--model", str(BUNDLED), "--out-dir", str(tmp_path / "out")],
        "export": ["--model", missing, "--out", str(tmp_path / "export")],
        "demo": ["--model", missing, "--out", str(tmp_path / "demo")],
        "evaluate": ["--lr", missing, "--hr-dir", missing, "--pred", f"m={missing}", "--out", str(tmp_path / "report")],
        "rating-study": ["make", "--lr", missing, "--method", f"m={missing}", "--out", str(tmp_path / "study")],
        "reproduce": ["--out", str(tmp_path / "file" / "repro"), "--budget", "45m"],
    }[name]
    (tmp_path / "file").write_text("a file where a folder is expected")
    result = runner.invoke(cli, [name, *given])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output
    assert str(tmp_path) in lines[-1]  # names the file
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # and wrote nothing


@pytest.mark.parametrize("args", [["phantom", "{file}"], ["export", "--model", "{missing}", "--out", "{file}"],
                                  ["demo", "--out", "{file}"]])
def test_an_output_folder_that_is_a_file_is_exit_1_naming_it(tmp_path, args):
    file = tmp_path / "file"
    file.write_text("a file where a folder is expected")
    fill = {"file": str(file), "missing": str(tmp_path / "missing.keras")}
    result = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("Error: ") and str(tmp_path) in lines[-1], result.output
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and file.read_text().startswith("a file")


@pytest.mark.parametrize("args", [
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "m=p", "--out", "o", "--axis", "5"],
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "m=p", "--out", "o", "--lr-psf-fwhm", "-1"],
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "m=p", "--out", "o", "--threshold", "nan"],
    ["rating-study", "make", "--lr", "a", "--method", "m=p", "--out", "o", "--slices", "0"],
    ["rating-study", "make", "--lr", "a", "--method", "m=p", "--out", "o", "--seed", "-5"],
    ["predict", "x.nii.gz", "--model", "m", "--out-dir", "o", "--axis", "3"],
    ["predict", "x.nii.gz", "--server", "127.0.0.1:1", "--out-dir", "o", "--timeout", "inf"],
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "m=p", "--out", "o", "--lr-psf-fwhm", "1e6"],
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "=p", "--out", "o"],
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "p", "--out", "o"],
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "m=p", "--pred", "m=q", "--out", "o"],
    ["evaluate", "--lr", "a", "--hr-dir", "b", "--pred", "bicubic=p", "--out", "o"],
    ["rating-study", "make", "--lr", "a", "--method", "p", "--out", "o"],
    ["rating-study", "make", "--lr", "a", "--method", "m=p", "--method", "m=q", "--out", "o"],
    ["demo", "--samples", "10001"],
    ["reproduce", "--out", "o", "--samples", "10001"],
    ["train", "--hr-dir", "b", "--out", "o"],
    ["train", "--lr-dir", "a", "--out", "o"],
])
def test_out_of_range_option_values_are_usage_errors(args):
    # a malformed value is exit 2 before any file is looked at: "a", "b", "p" and "q" do not exist
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Usage:" in result.output and "Traceback" not in result.output, result.output


def test_a_config_file_in_error_is_an_input_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 0\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(bad), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: {bad}: train.epochs must be >= 1, got 0"]


def _lr_scan(path: Path) -> Path:
    """A small scan at the bundled model's LR spacing (0.48 mm in-plane)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:12, :12] / 12
    disk = 1000.0 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.1)
    data = np.stack([disk + rng.normal(0, 20, disk.shape) for _ in range(3)], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.48, 0.48, 0.5, 1.0])), path)
    return path


def test_predict_progress_is_plain_lines_when_redirected(tmp_path):
    scan = _lr_scan(tmp_path / "scan.nii.gz")
    result = CliRunner().invoke(cli, ["predict", str(scan), "--model", str(BUNDLED), "--out-dir", str(tmp_path / "o"),
                                      "-T", "2", "--stitch", "whole", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "scan: 3/3 slices" in result.output
    assert not set("\r\b\x1b") & set(result.output)


def test_bfloat16_with_a_saved_model_names_it_and_what_to_pass(tmp_path):
    """An export that stores its generator's config is rebuilt as the Keras generator and runs in
    bfloat16; an export made before that runs its graphs in float32 only, and says so."""
    scan = _lr_scan(tmp_path / "scan.nii.gz")
    result = CliRunner().invoke(cli, ["predict", str(scan), "--model", str(BUNDLED), "--out-dir",
                                      str(tmp_path / "ok"), "--precision", "bfloat16", "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ok" / "scan_mean.nii.gz").is_file()

    old = older_export(BUNDLED, tmp_path / "old_export", missing="generator_config")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(scan), "--model", str(old), "--out-dir", str(out),
                                      "--precision", "bfloat16"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {old}: is an exported SavedModel, which runs in float32 only; pass --precision float32, or "
        "the training run or .keras file it came from for bfloat16"]
    assert not out.exists()


def test_file_system_errors_are_one_line_naming_the_path(tmp_path):
    import click

    from microsr_tf.cli._common import user_errors

    @click.command()
    @click.argument("path")
    @user_errors(tensorflow=False)
    def write(path):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("x")

    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "out.txt"  # a file where a folder is expected
    result = CliRunner().invoke(write, [str(target)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {target}: Not a directory"]


def test_running_out_of_memory_is_one_line_and_other_bugs_still_raise():
    import click
    import tensorflow as tf

    from microsr_tf.cli._common import user_errors

    @click.command()
    @click.argument("what")
    @user_errors
    def run(what):
        if what == "oom":  # what a too large allocation raises inside a TensorFlow graph
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape [8,1832,1832]")
        raise ValueError("a bug")

    result = CliRunner().invoke(run, ["oom"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("Error: out of memory") and "--memory-budget" in result.output
    result = CliRunner().invoke(run, ["bug"])
    assert isinstance(result.exception, ValueError)  # not dressed up as a user error


def test_output_folder_under_a_file_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["phantom", str(blocker / "out"), "--subjects", "1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {blocker / 'out'}: cannot create the output folder")
