"""The command group: lists every command and starts without importing TensorFlow."""

import subprocess
import sys


def test_help_lists_commands_without_importing_tensorflow():
    code = (
        "import sys; from click.testing import CliRunner; from microsr_tf.cli.main import cli;"
        "r = CliRunner().invoke(cli, ['--help']); print(r.output);"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_ABSENT')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("phantom", "prepare", "train", "predict"):
        assert name in out
    assert "TF_ABSENT" in out


def test_unknown_command_fails():
    from click.testing import CliRunner

    from microsr_tf.cli.main import cli

    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code != 0
    assert "No such command" in result.output


def test_file_system_errors_are_one_line_naming_the_path(tmp_path):
    import click
    from click.testing import CliRunner

    from microsr_tf.cli._common import user_errors

    @click.command()
    @click.argument("path")
    @user_errors
    def write(path):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("x")

    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "out.txt"  # a file where a folder is expected
    result = CliRunner().invoke(write, [str(target)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [f"Error: {target}: Not a directory"]


def test_output_folder_under_a_file_is_one_line_before_any_work(tmp_path):
    from click.testing import CliRunner

    from microsr_tf.cli.main import cli

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["phantom", str(blocker / "out"), "--subjects", "1"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {blocker / 'out'}: cannot create the output folder")
