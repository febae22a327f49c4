"""The CLI starts at once: help, version and completion never import torch or transformers.

Each check runs in a fresh interpreter, since the test process itself has long
imported both.
"""

from __future__ import annotations

import json
import subprocess
import sys

import typer.main

from llmprune.cli.app import app

HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "textual", "matplotlib")

# Runs every invocation in one interpreter, in order, and reports the heavy modules loaded after each:
# the first invocation that pulls one in is the one to blame.
_PROBE = r"""
import json, sys
heavy = json.loads(sys.argv[1])
invocations = json.loads(sys.argv[2])
loaded = {}
if invocations == ["import"]:
    import llmprune
    llmprune.__version__
    loaded["import llmprune"] = [m for m in heavy if m in sys.modules]
else:
    from llmprune.cli.app import app
    for args in invocations:
        try:
            app(args, prog_name="llmprune")
        except SystemExit:
            pass
        loaded[" ".join(args)] = [m for m in heavy if m in sys.modules]
print("PROBE" + json.dumps(loaded))
"""


def _heavy_modules_after(invocations: list[list[str]] | list[str]) -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEAVY), json.dumps(invocations)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("PROBE"))
    return json.loads(line[len("PROBE") :])


def _every_command_path(command=None, prefix=()) -> list[tuple[str, ...]]:
    command = command or typer.main.get_command(app)
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _every_command_path(sub, (*prefix, name))
    return paths


def test_the_walk_finds_every_subcommand():
    names = {" ".join(path) for path in _every_command_path()}
    assert {
        "prune",
        "analyze",
        "eval",
        "doctor",
        "finetune",
        "completion",
        "recipe",
        "recipe sweep",
        "recipe safe",
    } <= names


def test_help_of_the_app_and_every_subcommand_imports_no_heavy_library():
    invocations = [[*path, "--help"] for path in _every_command_path()]
    invocations += [
        ["--version"],
        ["completion", "bash"],
        ["completion", "zsh"],
        ["completion", "fish"],
        ["recipe", "--list"],
    ]
    loaded = _heavy_modules_after(invocations)
    assert set(loaded) == {" ".join(args) for args in invocations}
    assert {args: modules for args, modules in loaded.items() if modules} == {}


def test_import_llmprune_is_cheap_and_its_names_still_resolve():
    assert _heavy_modules_after(["import"]) == {"import llmprune": []}
    import llmprune

    for name in llmprune.__all__:
        assert getattr(llmprune, name) is not None
    assert callable(llmprune.load_model)
