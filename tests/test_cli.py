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
