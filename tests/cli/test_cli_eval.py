import json
import math

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app

runner = CliRunner()


def test_help_lists_the_six_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("analyze", "prune", "doctor", "eval", "finetune", "recipe"):
        assert name in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("llmprune ")


def test_eval_json_on_tiny_model(tiny_model_dir, pydoc_text_file):
    result = runner.invoke(
        app,
        [
            "eval",
            str(tiny_model_dir),
            "--dataset",
            str(pydoc_text_file),
            "--seq-len",
            "32",
            "--max-windows",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["windows"] == 4 and data["seq_len"] == 32 and data["tokens"] == 4 * 31
    assert math.isfinite(data["ppl"]) and data["ppl"] > 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "no-such-model"], "unknown model"),
        (["eval", "{model}", "--seq-len", "0"], "--seq-len"),
        (["eval", "{model}", "--max-windows", "-1"], "--max-windows"),
        (["eval", "{model}", "--dataset", "/no/such/file.txt"], "not found"),
        (["eval", "/"], "no config.json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, tiny_model_dir):
    args = [a.replace("{model}", str(tiny_model_dir)) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_python_dash_m_is_the_same_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llmprune", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("llmprune ")
