"""`llmprune prune --allocation search`: it runs, says so, records the search, resumes, and refuses bad input."""

import json

import pytest
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.pruning.config import PruneConfig, parse_search_budget
from llmprune.engine.pruning.route import choose_path

runner = CliRunner()


def _prune(model_dir, text_file, tmp_path, *extra):
    calib = ["--dataset", str(text_file), "--importance-samples", "4", "--seq-len", "32", "--batch-size", "4"]
    return runner.invoke(app, ["prune", str(model_dir), *extra, *calib, "--log-dir", str(tmp_path / "logs"), "--json"])


def test_the_search_path_is_chosen_by_its_option_and_says_why():
    path = choose_path(PruneConfig(model="some/model", allocation="search"))
    assert path.name == "search" and "KL to the dense model" in path.reason


def test_a_searched_prune_runs_records_its_search_and_a_rerun_resumes(tiny_model_dir, pydoc_text_file, tmp_path):
    out = tmp_path / "model"
    args = ["--allocation", "search", "--ratio", "0.25", "--search-windows", "16", "--out", str(out)]
    first = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *args, "--search-budget", "3000")
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["path"]["name"] == "search"
    search = report["search"]
    assert search["generations"] >= 1 and len(search["curve"]) == search["generations"]
    assert len(search["allocation"]) == 4 and search["start"] in search["start_fitness"]
    assert report["params_after"] < report["params_before"]
    assert (tmp_path / "model.search-state.json").is_file()
    again = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *args, "--search-budget", "6000", "--overwrite")
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.output)["search"]
    assert resumed["resumed_from"] == search["generations"]
    assert resumed["curve"][: search["generations"]] == search["curve"]


def test_the_searched_sizes_are_refitted_on_the_windows_asked_for(tiny_model_dir, pydoc_text_file, tmp_path):
    args = ["--allocation", "search", "--ratio", "0.25", "--search-windows", "16", "--search-budget", "2000"]
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *args, "--refit-samples", "12")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["options"]["refit_samples"] == 12 and report["options"]["calibration"]["samples"] == 4
    assert all(ran == "lstsq" for layer in report["layers"] for ran in layer["compensation"].values())


def test_the_search_selects_on_the_text_it_is_given(tiny_model_dir, pydoc_text_file, tmp_path):
    other = tmp_path / "served.txt"
    other.write_text(" ".join(f"served text number {i} of the kind the model will see." for i in range(400)))
    args = ["--allocation", "search", "--ratio", "0.25", "--search-windows", "16", "--search-budget", "2000"]
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *args, "--search-dataset", str(other))
    assert result.exit_code == 0, result.output
    state = json.loads(next((tmp_path / "logs").rglob("*.search-state.json")).read_text())
    assert state["signature"]["search_dataset"] == str(other)


@pytest.mark.parametrize("budget", ["0", "nan", "-5m", "soon", "inf"])
def test_a_bad_search_budget_is_one_line_exit_2(budget, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, "--allocation", "search", "--search-budget", budget)
    assert result.exit_code == 2
    assert "--search-budget" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--allocation", "search", "--stream"], "does not stream"),
        (["--search-budget", "5m"], "--search-budget is not used by the global path"),
        (["--allocation", "search", "--search-windows", "8"], "--search-windows must be ≥ 16"),
        (["--allocation", "search", "--drop-layers", "1"], "--drop-layers is not used by the search path"),
        (["--search-dataset", "pydoc"], "--search-dataset is not used by the global path"),
        (["--allocation", "search", "--search-dataset", "nosuch.txt"], "nosuch.txt"),
    ],
)
def test_what_the_search_cannot_do_is_one_line_exit_2(extra, needle, tiny_model_dir, pydoc_text_file, tmp_path):
    result = _prune(tiny_model_dir, pydoc_text_file, tmp_path, *extra)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())


def test_budgets_read_as_time_or_tokens():
    assert parse_search_budget("20m") == ("seconds", 1200)
    assert parse_search_budget("90s") == ("seconds", 90)
    assert parse_search_budget("1.5h") == ("seconds", 5400)
    assert parse_search_budget("2M") == ("tokens", 2e6)
    assert parse_search_budget("500k") == ("tokens", 5e5)
    with pytest.raises(UserInputError):
        parse_search_budget("0")


@pytest.mark.parametrize("allocation", ["plan", "global", "search"])
def test_recipes_and_the_sweep_prune_with_the_allocation_prune_would_use(allocation, tmp_path):
    from llmprune.engine.recipes.config import RecipeConfig
    from llmprune.engine.recipes.registry import get_recipe
    from llmprune.engine.recipes.steps import recipe_prune_config

    budget = "2M" if allocation == "search" else None
    config = RecipeConfig(recipe=get_recipe("safe"), model="some/model", allocation=allocation, search_budget=budget)
    prune = recipe_prune_config(config, tmp_path / "importance.json", 0.2, tmp_path, "pruned")
    assert choose_path(prune).name == allocation
    assert prune.search_budget == budget
    if allocation == "search":
        chosen = RecipeConfig(recipe=get_recipe("safe"), model="m", allocation="search", search_dataset="pydoc")
        assert recipe_prune_config(chosen, tmp_path / "i.json", 0.2, tmp_path, "p").search_dataset == "pydoc"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"allocation": "evolve"}, "unknown --allocation"),
        ({"search_budget": "5m"}, "only used by --allocation search"),
        ({"search_dataset": "pydoc"}, "--search-dataset is only used by --allocation search"),
    ],
)
def test_a_recipe_with_a_bad_allocation_is_refused(values, needle):
    from llmprune.engine.recipes.config import RecipeConfig
    from llmprune.engine.recipes.registry import get_recipe

    config = RecipeConfig(
        recipe=get_recipe("safe"), model="some/model", dataset="pydoc", eval_dataset="pydoc", **values
    )
    with pytest.raises(UserInputError, match=needle):
        config.validate_budget()


def test_the_summary_says_what_the_search_did_and_when_it_kept_its_start():
    from llmprune.ui.prune_report import search_line

    search = {"start": "global", "start_fitness": {"global": 0.3568, "uniform": 0.3381}, "generations": 54,
              "seconds": 720.0, "tokens": 331776, "fitness": 0.3012, "kept_start": False}  # fmt: skip
    line = search_line(search)
    assert "54 generations (12.0 min, 331,776 tokens) from the global start" in line
    assert line.endswith("0.3568 → 0.3012")
    assert search_line({**search, "kept_start": True, "fitness": 0.3568}).endswith("the start was kept")


def test_the_search_progress_detail_changes_without_making_a_new_phase():
    from llmprune.engine.core.process_memory import PhasePeaks
    from llmprune.engine.pruning.pipeline import _phase_progress
    from llmprune.ui.prune_report import search_line

    phases, shown = PhasePeaks(), []
    update = _phase_progress(lambda stage, done, total: shown.append(stage), phases)
    update("levels", 30, 30)
    update("search · generation 1, KL 0.6190, ETA 4.2 min", 1, 2)
    update("search · generation 2, KL 0.6181, ETA 0.0 min", 2, 3)
    assert list(phases.close()) == ["levels", "search"]
    assert shown[-1] == "search · generation 2, KL 0.6181, ETA 0.0 min"
    one = {"start": "global", "start_fitness": {"global": 0.5}, "generations": 1, "seconds": 60.0, "tokens": 10}
    assert search_line({**one, "fitness": 0.4}).startswith("1 generation (1.0 min")
