"""`llmprune recipe sweep` on a tiny random Llama: one analysis, one row per ratio, JSON and chart."""

import json

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app


def sweep(model_dir, corpus, out, *extra):
    args = [
        "recipe",
        "sweep",
        str(model_dir),
        "--dataset",
        str(corpus),
        "--eval-dataset",
        str(corpus),
        "--seq-len",
        "32",
        "--importance-samples",
        "4",
        "--eval-windows",
        "4",
        "--out",
        str(out),
        "--ratio",
        "0.5",
        "--ratio",
        "0.25",
        *extra,
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_sweep_compares_ratios_in_one_table_with_json_and_chart(tiny_model_dir, pydoc_text_file, tmp_path):
    data = sweep(tiny_model_dir, pydoc_text_file, tmp_path)
    rows = data["rows"]
    assert [row["ratio"] for row in rows] == [0.0, 0.25, 0.5]
    assert rows[0]["verdict"] == "reference" and rows[0]["share_removed"] == 0.0
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert all(row["verdict"] in ("healthy", "acceptable", "too high", "broken") for row in rows[1:])
    run_dir = tmp_path / f"{tiny_model_dir.name}-sweep"
    assert json.loads((run_dir / "sweep.json").read_text())["rows"] == rows
    assert (run_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert data["importance_config"] == str(run_dir / "layer_importance_config.json")


def test_sweep_reuses_a_saved_importance_analysis(tiny_model_dir, pydoc_text_file, tmp_path):
    first = sweep(tiny_model_dir, pydoc_text_file, tmp_path / "a")
    again = sweep(tiny_model_dir, pydoc_text_file, tmp_path / "b", "--importance-config", first["importance_config"])
    assert again["importance_config"] == first["importance_config"]
    assert not (tmp_path / "b" / f"{tiny_model_dir.name}-sweep" / "layer_importance_config.json").exists()
    assert [(r["ratio"], r["params"]) for r in again["rows"]] == [(r["ratio"], r["params"]) for r in first["rows"]]


def test_sweep_without_ratios_is_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["recipe", "sweep", "smollm2-135m", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--ratio" in result.output


def test_a_sweep_row_predicts_the_recipe_at_that_ratio(tiny_model_dir, pydoc_text_file, tmp_path):
    # the sweep and `recipe safe --ratio r` prune through the same run_prune with the same settings
    data = sweep(tiny_model_dir, pydoc_text_file, tmp_path / "sweep")
    args = [
        "recipe",
        "safe",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(pydoc_text_file),
        "--eval-dataset",
        str(pydoc_text_file),
        "--seq-len",
        "32",
        "--calibration-samples",
        "4",
        "--eval-windows",
        "4",
        "--out",
        str(tmp_path / "runs"),
        "--ratio",
        "0.25",
        "--skip-finetune",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (
        0,
        1,
    ), result.output  # the gate may stop a random model; the pruned row is there either way
    report = json.loads(result.stdout)
    assert report["prune_path"]["name"] == "plan" and "--importance-config" in report["prune_path"]["reason"]
    pruned = next(row for row in report["rows"] if row["stage"] == "pruned")
    row = next(row for row in data["rows"] if row["ratio"] == 0.25)
    assert pruned["params"] == row["params"]
    assert pruned["ppl"] == row["ppl"]


@pytest.mark.parametrize("command", [["recipe", "safe"], ["recipe", "sweep"], ["prune"], ["analyze"]])
def test_one_name_per_option_with_the_old_names_hidden(command):
    shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250"}).output
    for name in ("--importance-method", "--importance-samples"):
        assert name in shown
    if command[0] == "recipe":
        assert "--pruning-strategy" in shown and "--prune-mlp" in shown
        for old in ("--importance ", "--strategy ", "--calibration-samples", "--mlp "):
            assert old not in shown


def test_recipe_help_shows_the_recipes_own_values():
    shown = " ".join(CliRunner().invoke(app, ["recipe", "attn-only", "--help"], env={"COLUMNS": "250"}).output.split())
    assert "[default: 1.2]" in shown and "[default: no-prune-mlp]" in shown


def test_every_finetune_setting_is_an_option_of_finetune_and_the_recipes_set_only_theirs():
    import dataclasses

    import typer.main

    from llmprune.engine.finetune.config import FinetuneConfig
    from llmprune.engine.recipes.registry import RECIPE_FINETUNE_FIELDS, RECIPES

    finetune = next(c for c in typer.main.get_group(app).commands.values() if c.name == "finetune")
    options = {param.name for param in finetune.params}
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} <= options  # declared once, offered everywhere
    recipe = typer.main.get_group(app).commands["recipe"].commands["safe"]
    offered = {param.name.removeprefix("finetune__") for param in recipe.params if param.name.startswith("finetune__")}
    assert offered == set(RECIPE_FINETUNE_FIELDS)
    # the recipe overrides finetune's values; what it does not set keeps finetune's default
    safe = RECIPES["safe"].finetune
    assert (safe.samples, safe.epochs, safe.lr) == (1000, 2, 5e-7)
    assert (safe.schedule, safe.weight_decay, safe.seed) == (FinetuneConfig.schedule, 0.0, 0)
    with pytest.raises(TypeError):
        RECIPES["safe"].with_overrides(finetune={"dataset": "ptb"})  # the run's text is not the recipe's


def test_lora_targets_are_one_comma_separated_option(tiny_model_dir, tmp_path, monkeypatch):
    import llmprune.cli.finetune as finetune_cli

    seen = {}
    monkeypatch.setattr(finetune_cli, "_train_and_report", lambda config, plan, **_: seen.setdefault("config", config))
    result = CliRunner().invoke(
        app, ["finetune", str(tiny_model_dir), "--method", "lora", "--lora-targets", "q_proj, v_proj", "--no-tui"]
    )
    assert result.exit_code == 0, result.output
    assert seen["config"].lora_targets == ("q_proj", "v_proj") and seen["config"].method == "lora"


def test_a_recipe_run_records_its_fine_tune_settings_as_runs_made_before_did(tmp_path):
    from llmprune.engine.recipes.config import RecipeConfig
    from llmprune.engine.recipes.registry import RECIPES

    settings = RecipeConfig(recipe=RECIPES["safe"], out=str(tmp_path), teacher=False).settings()
    # the keys an earlier run's state.json holds, so that rerunning its command still resumes it
    assert settings["recipe"]["finetune"] == {
        "lr": 5e-7,
        "epochs": 2,
        "samples": 1000,
        "method": "full",
        "batch_size": 1,
        "grad_accum": 4,
        "max_grad_norm": 0.5,
        "warmup_steps": 50,
        "teacher": False,
    }
