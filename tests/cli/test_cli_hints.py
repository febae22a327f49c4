"""Every hint names only options the command that prints it really has.

A hint that says "widen --min-pruning-rate" to a user of `recipe`, which has no
such option, sends them to an error. Each bad input below is run through the
real command; every `--option` in what it prints must be one of that command's
parameters, unless the text names another command first ("llmprune prune
--ratio ..."), in which case it must be one of that command's.
"""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from llmprune.cli.app import app

runner = CliRunner()
GLOBAL_OPTIONS = {"--debug", "--help", "--version"}
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# "llmprune prune --ratio ..." or "llmprune recipe attn-only --ratio ...": the clause belongs to that command
_OTHER_COMMAND = re.compile(r"llmprune ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?([^;→)\n]*)")


def _options(path: tuple[str, ...]) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | GLOBAL_OPTIONS


def _command_path(words: list[str]) -> tuple[str, ...]:
    group = typer.main.get_command(app)
    first = words[0]
    if first == "recipe" and len(words) > 1 and words[1] in group.commands["recipe"].commands:
        return ("recipe", words[1])
    return (first,) if first in group.commands else ()


def wrong_options(text: str, command: tuple[str, ...]) -> list[str]:
    """The `--options` in `text` that the command they are attributed to does not have."""
    wrong = []
    rest = text
    for match in _OTHER_COMMAND.finditer(text):
        path = _command_path([match.group(1), *(filter(None, [match.group(2)]))])
        if not path:
            continue
        wrong += [(path, opt) for opt in _OPTION.findall(match.group(3)) if opt not in _options(path)]
        rest = rest.replace(match.group(0), " ")
    mine = _options(command)
    wrong += [(command, opt) for opt in _OPTION.findall(rest) if opt not in mine]
    return [f"{' '.join(path)}: {opt}" for path, opt in wrong]


def test_the_checker_itself_catches_a_foreign_option():
    assert wrong_options("widen --min-pruning-rate or change --ratio", ("recipe", "safe")) == [
        "recipe safe: --min-pruning-rate"
    ]
    assert wrong_options("re-prune (llmprune prune --ratio 0.1) or --ratio", ("recipe", "safe")) == []
    assert wrong_options("llmprune prune --nonsense", ("doctor",)) == ["prune: --nonsense"]


MODEL = "{model}"
TEXT = "{text}"
BAD_INPUTS = [
    ["eval", MODEL, "--seq-len", "0"],
    ["eval", MODEL, "--max-windows", "0"],
    ["eval", MODEL, "--batch-size", "0", "--dataset", TEXT],
    ["eval", MODEL, "--dataset", "{tmp}/missing.txt"],
    ["eval", MODEL, "--dataset", TEXT, "--seq-len", "100000"],
    ["eval", MODEL, "--dataset", TEXT, "--max-new-tokens", "0", "--prompt", "hi"],
    ["eval", "{tmp}/no-model"],
    ["analyze", MODEL, "--dataset", TEXT, "--ratio", "0.95"],
    ["analyze", MODEL, "--dataset", TEXT, "--alpha", "-1"],
    ["analyze", MODEL, "--dataset", TEXT, "--importance-method", "psychic"],
    ["analyze", MODEL, "--dataset", TEXT, "--min-pruning-rate", "0.9", "--max-pruning-rate", "0.1"],
    ["analyze", MODEL, "--dataset", TEXT, "--layer-start", "10"],
    ["analyze", MODEL, "--dataset", TEXT, "--importance-samples", "0"],
    ["analyze", MODEL, "--dataset", TEXT, "-o", "{tmp}"],
    ["prune", MODEL, "--dataset", TEXT, "--ratio", "1.5"],
    ["prune", MODEL, "--dataset", TEXT, "--ratio", "0.95", "--pruning-strategy", "inverse"],
    ["prune", MODEL, "--dataset", TEXT, "--drop-layers", "10"],
    ["prune", MODEL, "--dataset", TEXT, "--stream", "--drop-layers", "1"],
    ["prune", MODEL, "--dataset", TEXT, "--attn-unit", "half"],
    ["prune", MODEL, "--dataset", TEXT, "--compensation", "magic"],
    ["prune", MODEL, "--dataset", TEXT, "--allocation", "random"],
    ["prune", MODEL, "--dataset", TEXT, "--target-params", "lots"],
    ["prune", MODEL, "--dataset", TEXT, "--ratio", "0.2", "--target-params", "0.8"],
    ["prune", MODEL, "--dataset", TEXT, "--round-to", "0"],
    ["prune", MODEL, "--dataset", TEXT, "--out", "."],
    ["finetune", MODEL, "--method", "magic"],
    ["finetune", MODEL, "--lr", "0"],
    ["finetune", MODEL, "--merge"],
    ["finetune", MODEL, "--resume"],
    ["finetune", MODEL, "--samples", "0"],
    ["finetune", MODEL, "--on-nan", "pray"],
    ["finetune", MODEL, "--dataset", TEXT, "--seq-len", "100000", "--out", "{tmp}/run"],
    ["finetune", "--watch", "{tmp}"],
    ["finetune"],
    ["doctor", MODEL, "--base-ppl", "-1"],
    ["doctor", MODEL, "--ppl", "--seq-len", "0"],
    ["doctor", "{tmp}/missing.safetensors"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--ratio", "0.95"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--ratio", "0"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--strategy", "random"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--importance", "psychic"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--alpha", "-1"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--lr", "0"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--min-ratio", "0.5"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--name", "a b"],
    ["recipe", "safe", "--model", MODEL, "--dataset", TEXT, "--eval-dataset", TEXT, "--calibration-samples", "0"],
    ["recipe", "safe", "--model", MODEL, "--dataset", "{tmp}/missing.txt"],
    ["recipe", "sweep", MODEL, "--ratio", "1.5"],
    ["recipe", "sweep", MODEL, "--recipe", "nope", "--ratio", "0.2"],
    ["recipe", "sweep", MODEL],
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=[" ".join(a[:1] + a[2:4]) for a in BAD_INPUTS])
def test_every_hint_names_only_options_of_its_command(args, tiny_model_dir, pydoc_text_file, tmp_path):
    args = [
        a.replace(MODEL, str(tiny_model_dir)).replace(TEXT, str(pydoc_text_file)).replace("{tmp}", str(tmp_path))
        for a in args
    ]
    if args[0] == "recipe" and args[1] != "sweep":
        args += ["--out", str(tmp_path / "runs"), "--no-tui", "--seq-len", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stderr.strip(), "a refusal says why"
    path = _command_path(args)
    assert wrong_options(result.output, path) == [], result.output


def test_doctor_advice_names_options_of_the_command_it_recommends(tiny_model_dir, tmp_path):
    """doctor's findings advise pruning differently: each option there must belong to the command the advice names."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    tensors["model.layers.2.mlp.down_proj.weight"] *= 1e6
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = runner.invoke(app, ["doctor", str(broken), "--test-forward", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    texts = report["advice"] + [finding["message"] for finding in report["findings"]]
    assert len(report["advice"]) >= 3
    assert [wrong for text in texts for wrong in wrong_options(text, ("doctor",))] == []
    from llmprune.engine.core.findings import Advice

    every_advice = [value for name, value in vars(Advice).items() if name.isupper()]
    assert [wrong for text in every_advice for wrong in wrong_options(text, ("doctor",))] == []
