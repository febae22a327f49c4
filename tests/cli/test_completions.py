"""The committed completion scripts are the ones the app generates now, and they complete."""

import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.cli.completion_scripts import SCRIPT_FILES, SHELLS, completion_script
from tests.conftest import REPO_ROOT

COMPLETIONS = REPO_ROOT / "completions"


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_scripts_are_current(shell):
    committed = (COMPLETIONS / SCRIPT_FILES[shell]).read_text(encoding="utf-8")
    assert committed == completion_script(app, shell), (
        f"completions/{SCRIPT_FILES[shell]} is stale: run `make completions`"
    )


def test_completion_command_prints_the_script_and_writes_all_three(tmp_path):
    runner = CliRunner()
    printed = runner.invoke(app, ["completion", "fish"])
    assert printed.exit_code == 0 and printed.stdout == completion_script(app, "fish")
    written = runner.invoke(app, ["completion", "--write", str(tmp_path)])
    assert written.exit_code == 0, written.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SCRIPT_FILES.values())


def test_unknown_shell_is_exit_2():
    result = CliRunner().invoke(app, ["completion", "tcsh"])
    assert result.exit_code == 2 and "unknown shell" in result.output


def _bash_complete(*words: str) -> list[str]:
    script = f"""
source {COMPLETIONS / SCRIPT_FILES["bash"]}
COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}
_llmprune; printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    out = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, check=True, cwd="/")
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_script_completes_subcommands_options_and_values():
    assert _bash_complete("llmprune", "ev") == ["eval"]
    assert _bash_complete("llmprune", "eval", "--dev") == ["--device"]
    assert _bash_complete("llmprune", "--debug", "eval", "--device", "c") == ["cpu", "cuda"]
    assert _bash_complete("llmprune", "eval", "sm") == ["smollm2-135m"]
    assert _bash_complete("llmprune", "eval", "--seq-len", "") == []  # a number: nothing to offer


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_script_completes_subcommands_options_and_values():
    def complete(line: str) -> list[str]:
        command = f"source {COMPLETIONS / SCRIPT_FILES['fish']}; complete -C '{line}'"
        out = subprocess.run(
            ["fish", "--no-config", "-c", command], capture_output=True, text=True, check=True, cwd="/"
        )
        return [entry.split("\t")[0] for entry in out.stdout.splitlines()]

    assert complete("llmprune ev") == ["eval"]
    assert complete("llmprune eval --dev") == ["--device"]
    assert complete("llmprune --debug eval --device c") == ["cpu", "cuda"]
    assert complete("llmprune eval --seq-len ") == []
