"""Recipes end to end on a tiny random Llama: real analysis, pruning, doctor, fine-tuning and resume."""

import json

import pytest
import torch
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.io.checkpoint import save_model
from llmprune.engine.io.models import load_model
from llmprune.engine.recipes.registry import get_recipe
from llmprune.engine.recipes.runner import RecipeConfig, StepSkipped, StepStarted, run_recipe
from llmprune.engine.recipes.steps import StepAdapters

BUDGET = [
    "--seq-len",
    "32",
    "--calibration-samples",
    "4",
    "--eval-windows",
    "4",
    "--samples",
    "8",
    "--epochs",
    "1",
    "--warmup-steps",
    "0",
    "--batch-size",
    "4",
]


def recipe_config(model_dir, corpus, out, ratio=0.3, **kwargs) -> RecipeConfig:
    recipe = get_recipe("safe").with_overrides(
        prune={"ratio": ratio}, finetune={"samples": 8, "epochs": 1, "warmup_steps": 0}
    )
    return RecipeConfig(
        recipe=recipe,
        model=str(model_dir),
        out=str(out),
        dataset=str(corpus),
        eval_dataset=str(corpus),
        seq_len=32,
        calibration_samples=4,
        eval_windows=4,
        batch_size=4,
        **kwargs,
    )


class BreaksAbove(StepAdapters):
    """Real steps, except that a model pruned above `threshold` gets its output layer blown up ×8
    (confidently wrong predictions): a planted broken prune, which the real check must catch."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.finetuned = False

    def prune(self, config, importance_config, ratio, out_dir, progress=None):
        result = super().prune(config, importance_config, ratio, out_dir, progress)
        if ratio > self.threshold:
            loaded = load_model(str(out_dir))
            with torch.no_grad():
                loaded.model.lm_head.weight.mul_(8.0)
            save_model(loaded.model, loaded.tokenizer, out_dir, provenance=loaded.provenance)
        return result

    def finetune(self, *args, **kwargs):
        self.finetuned = True
        return super().finetune(*args, **kwargs)


def test_recipe_cli_runs_end_to_end_and_saves_the_report(tiny_model_dir, pydoc_text_file, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "recipe",
            "safe",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(pydoc_text_file),
            "--eval-dataset",
            str(pydoc_text_file),
            "--out",
            str(tmp_path),
            "--ratio",
            "0.3",
            *BUDGET,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "done" and [row["stage"] for row in report["rows"]] == ["base", "pruned", "fine-tuned"]
    base, pruned, tuned = report["rows"]
    assert pruned["params"] < base["params"] and tuned["params"] == pruned["params"]
    assert pruned["verdict"] in ("healthy", "acceptable")
    run_dir = tmp_path / f"{tiny_model_dir.name}-safe-30"
    assert json.loads((run_dir / "report.json").read_text())["rows"] == report["rows"]
    assert "fine-tuned" in (run_dir / "report.txt").read_text()
    reloaded = load_model(tuned["path"])
    assert reloaded.num_parameters == tuned["params"]


def test_the_gate_stops_on_a_planted_broken_model_and_fine_tunes_nothing(tiny_model_dir, pydoc_text_file, tmp_path):
    steps = BreaksAbove(threshold=0.0)
    report = run_recipe(recipe_config(tiny_model_dir, pydoc_text_file, tmp_path), steps=steps)
    assert report.status == "stopped_at_gate" and not steps.finetuned
    assert report.row("pruned").verdict in ("too high", "broken")
    assert not (tmp_path / f"{tiny_model_dir.name}-safe-30" / "finetune").exists()
    assert any("--ratio" in line for line in report.advice)


def test_auto_retreat_re_prunes_lower_until_the_verdict_passes(tiny_model_dir, pydoc_text_file, tmp_path):
    steps = BreaksAbove(threshold=0.2)
    report = run_recipe(
        recipe_config(tiny_model_dir, pydoc_text_file, tmp_path, ratio=0.3, auto_retreat=True, skip_finetune=True),
        steps=steps,
    )
    assert report.status == "done" and report.ratio_used == 0.2
    assert [attempt["ratio"] for attempt in report.attempts] == [0.3, 0.25, 0.2]
    assert [attempt["verdict"] in ("healthy", "acceptable") for attempt in report.attempts] == [False, False, True]
    assert len(report.retreats) == 2 and "0.25" in report.retreats[0]


class InterruptedCheck(StepAdapters):
    def evaluate(self, model, config, base_ppl=None, health=False, progress=None):
        if health and base_ppl is not None:  # the baseline checks the base model's health too
            raise KeyboardInterrupt  # Ctrl-C while the pruned model is being evaluated
        return super().evaluate(model, config, base_ppl, health, progress)


def test_a_run_interrupted_after_pruning_resumes_at_the_evaluation(tiny_model_dir, pydoc_text_file, tmp_path):
    config = recipe_config(tiny_model_dir, pydoc_text_file, tmp_path, skip_finetune=True)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(config, steps=InterruptedCheck())
    assert (config.run_dir / "pruned" / "config.json").is_file()  # step 3's output is usable as it is
    events = []
    report = run_recipe(config, events.append)
    assert [e.step for e in events if isinstance(e, StepSkipped)][:3] == ["baseline", "analyze", "prune"]
    assert [e.step for e in events if isinstance(e, StepStarted)][0] == "check"
    assert report.status == "done"


def test_recipe_without_a_name_lists_the_recipes():
    runner = CliRunner()
    listed = runner.invoke(app, ["recipe", "--json"])
    assert listed.exit_code == 0
    recipes = {r["name"]: r for r in json.loads(listed.stdout)["recipes"]}
    assert recipes["safe"]["finetune"]["lr"] == 5e-7 and recipes["attn-only"]["prune"]["ratio"] == 0.2
    table = runner.invoke(app, ["recipe"])
    assert table.exit_code == 0 and "attn-only" in table.stdout and "5e-07" in table.stdout


def test_bad_recipe_input_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["recipe", "safe", "--ratio", "1.5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--ratio" in result.output and "Traceback" not in result.output
