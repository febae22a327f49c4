"""The recipe runner's control flow (gate, auto-retreat, resume) with scripted steps.

The steps are replaced by a fake whose pruned PPL grows with the ratio, so each
test decides exactly where the model breaks. End-to-end runs on real (tiny)
models are in test_recipe_e2e.py.
"""

import json

import pytest

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.recipes.registry import RECIPES, get_recipe
from llmprune.engine.recipes.runner import Notice, RecipeConfig, StepSkipped, StepStarted, run_recipe

BASE_PPL = 10.0


class ScriptedSteps:
    """Pruned PPL = base × (1 + 20 ratio²): 15 % → 1.45× (acceptable), 30 % → 2.8× (too high), 45 % → 5× (broken)."""

    def __init__(self, interrupt_at: str | None = None):
        self.calls: list[tuple] = []
        self.interrupt_at = interrupt_at

    def _maybe_interrupt(self, step: str) -> None:
        if self.interrupt_at == step:
            self.interrupt_at = None
            raise KeyboardInterrupt

    def evaluate(self, model, config, base_ppl=None, health=False, progress=None):
        step = "baseline" if base_ppl is None else ("final_eval" if "finetune" in model else "check")
        self.calls.append((step, model))
        self._maybe_interrupt(step)
        if step == "baseline":
            return {"model": model, "params": 1000, "ppl": BASE_PPL, "windows": 4, "seconds": 0.1}
        if step == "check":
            ratio = json.loads((config.run_dir / "pruned" / "ratio.json").read_text())
            ppl = BASE_PPL * (1 + 20 * ratio**2)
        else:
            ppl = BASE_PPL * 1.1
        rel = ppl / base_ppl
        verdict = "healthy" if rel < 1.25 else "acceptable" if rel < 2 else "too high" if rel < 4 else "broken"
        return {
            "model": model,
            "params": 800,
            "ppl": ppl,
            "windows": 4,
            "verdict": verdict,
            "explanation": "",
            "advice": ["re-prune at a lower ratio"],
            "healthy_weights": True,
            "errors": [],
            "seconds": 0.1,
        }

    def analyze(self, config, out_dir, progress=None):
        self.calls.append(("analyze",))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "layer_importance_config.json").write_text("{}")
        return {
            "importance_config": str(out_dir / "layer_importance_config.json"),
            "method": "removal",
            "scores": [0.1] * 6,
        }

    def prune(self, config, importance_config, ratio, out_dir, progress=None):
        self.calls.append(("prune", ratio))
        self._maybe_interrupt("prune")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "ratio.json").write_text(json.dumps(ratio))
        return {"model_dir": str(out_dir), "params": 800, "share_removed": 0.2}

    def finetune(self, config, model_dir, out_dir, resume, listener, host, teacher=None):
        self.calls.append(("finetune", resume))
        self.teacher = teacher
        self._maybe_interrupt("finetune")
        (out_dir / "model").mkdir(parents=True, exist_ok=True)
        return {
            "status": "completed",
            "model_dir": str(out_dir / "model"),
            "run_dir": str(out_dir),
            "steps": 3,
            "final_loss": 2.0,
            "message": "",
        }

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


def config_for(tmp_path, ratio=0.15, **kwargs) -> RecipeConfig:
    recipe = get_recipe("safe").with_overrides(prune={"ratio": ratio})
    return RecipeConfig(recipe=recipe, model="base-model", out=str(tmp_path), **kwargs)


def test_every_registered_recipe_loads_and_validates(tmp_path):
    assert {"safe", "attn-only"} <= set(RECIPES)
    for name, recipe in RECIPES.items():
        assert get_recipe(name) is recipe and recipe.name == name
        RecipeConfig(recipe=recipe, out=str(tmp_path)).validate()
    assert RECIPES["safe"].prune.ratio == 0.15 and RECIPES["safe"].finetune.lr == 5e-7
    assert RECIPES["attn-only"].prune.prune_mlp is False and RECIPES["attn-only"].finetune.lr == 1e-6


def test_unknown_recipe_is_user_error():
    with pytest.raises(UserInputError, match="unknown recipe"):
        get_recipe("reckless")


def test_a_healthy_run_goes_through_every_step_and_reports(tmp_path):
    steps = ScriptedSteps()
    report = run_recipe(config_for(tmp_path), steps=steps)
    assert steps.names() == ["baseline", "analyze", "prune", "check", "finetune", "final_eval"]
    assert report.status == "done" and [row.stage for row in report.rows] == ["base", "pruned", "fine-tuned"]
    assert report.row("pruned").verdict == "acceptable"
    saved = json.loads((tmp_path / "base-model-safe-15" / "report.json").read_text())
    assert saved["status"] == "done" and len(saved["rows"]) == 3
    assert "fine-tuned" in (tmp_path / "base-model-safe-15" / "report.txt").read_text()


def test_the_gate_stops_a_broken_model_and_fine_tunes_nothing(tmp_path):
    steps = ScriptedSteps()
    events = []
    report = run_recipe(config_for(tmp_path, ratio=0.45), events.append, steps=steps)
    assert report.status == "stopped_at_gate" and "finetune" not in steps.names()
    assert report.row("pruned").verdict == "broken" and report.row("fine-tuned") is None
    assert any("--ratio 0.4" in line for line in report.advice) and any("attn-only" in line for line in report.advice)
    assert any("--layer-start 2 --layer-end 4" in line for line in report.advice)  # 6 layers: protect 0-1 and 4-5
    assert any(isinstance(e, Notice) and e.level == "error" and "gate" in e.message for e in events)


def test_auto_retreat_lowers_the_ratio_reusing_the_analysis(tmp_path):
    steps = ScriptedSteps()
    report = run_recipe(config_for(tmp_path, ratio=0.40, auto_retreat=True), steps=steps)
    assert report.status == "done"
    prunes = [call[1] for call in steps.calls if call[0] == "prune"]
    assert prunes == [0.40, 0.35, 0.30, 0.25, 0.20]  # 0.25 → 2.25×: too high; 0.20 → 1.8×: acceptable
    assert steps.names().count("analyze") == 1
    assert report.ratio_used == 0.20 and len(report.retreats) == 4
    assert [attempt["ratio"] for attempt in report.attempts] == prunes


def test_auto_retreat_gives_up_at_min_ratio(tmp_path):
    steps = ScriptedSteps()
    report = run_recipe(config_for(tmp_path, ratio=0.45, auto_retreat=True, min_ratio=0.35), steps=steps)
    assert report.status == "stopped_at_gate" and "finetune" not in steps.names()
    assert [call[1] for call in steps.calls if call[0] == "prune"] == [0.45, 0.40, 0.35]


def test_an_interrupted_run_resumes_at_the_step_it_stopped_in(tmp_path):
    steps = ScriptedSteps(interrupt_at="check")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(config_for(tmp_path), steps=steps)
    assert steps.names() == ["baseline", "analyze", "prune", "check"]
    state = json.loads((tmp_path / "base-model-safe-15" / "state.json").read_text())
    assert set(state["steps"]) == {"baseline", "analyze", "prune"} and state["status"] == "interrupted"

    events = []
    resumed = ScriptedSteps()
    report = run_recipe(config_for(tmp_path), events.append, steps=resumed)
    assert resumed.names() == ["check", "finetune", "final_eval"]
    assert [e.step for e in events if isinstance(e, StepSkipped)] == ["baseline", "analyze", "prune"]
    assert [e.step for e in events if isinstance(e, StepStarted)][0] == "check"
    assert report.status == "done"


def test_an_interrupted_finetune_resumes_from_its_checkpoint(tmp_path):
    steps = ScriptedSteps(interrupt_at="finetune")
    config = config_for(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(config, steps=steps)
    checkpoints = config.run_dir / "finetune" / "checkpoints"  # what an interrupted finetune leaves behind
    (checkpoints / "step-000002").mkdir(parents=True)
    (checkpoints / "latest.json").write_text(json.dumps({"path": "step-000002"}))
    resumed = ScriptedSteps()
    run_recipe(config, steps=resumed)
    assert resumed.calls[0] == ("finetune", True)


def test_a_finetune_that_finished_after_the_recipe_stopped_counts_as_done(tmp_path):
    """The recipe stopped (its terminal went away) while its fine-tune went on to the end: a rerun uses that model."""
    steps = ScriptedSteps(interrupt_at="finetune")
    config = config_for(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(config, steps=steps)
    run = config.run_dir / "finetune"
    (run / "checkpoints" / "step-000008").mkdir(parents=True)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 8, "path": "step-000008"}))
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    record = {"status": "completed", "steps": 8, "total_steps": 8, "model_dir": str(run / "model"), "final_loss": 1.5}
    (run / "run.json").write_text(json.dumps(record))
    events = []
    rerun = ScriptedSteps()
    report = run_recipe(config, events.append, steps=rerun)
    assert rerun.names() == ["final_eval"] and report.status == "done"
    assert any(isinstance(e, Notice) and "had finished (8 steps)" in e.message for e in events)
    state = json.loads((config.run_dir / "state.json").read_text())
    assert state["steps"]["finetune"]["result"]["model_dir"] == str(run / "model")


class HugeWeightSteps(ScriptedSteps):
    """The pruned model's PPL is fine but doctor finds a huge weight: the check's verdict is what _health makes."""

    def evaluate(self, model, config, base_ppl=None, health=False, progress=None):
        result = super().evaluate(model, config, base_ppl, health, progress)
        if "pruned" in model:
            error = {"severity": "error", "check": "huge", "message": "abnormally large values (layer 3)"}
            result.update(verdict="unhealthy", healthy_weights=False, errors=[error], explanation="unhealthy weights")
        return result


def test_the_gate_gives_one_verdict_when_the_weights_are_unhealthy(tmp_path):
    events = []
    report = run_recipe(config_for(tmp_path, ratio=0.05), events.append, steps=HugeWeightSteps())
    assert report.status == "stopped_at_gate" and report.row("pruned").verdict == "unhealthy"
    stop = next(e.message for e in events if isinstance(e, Notice) and e.level == "error")
    assert "the pruned model is unhealthy (its weights fail doctor's check: abnormally large values" in stop
    assert "healthy," not in stop and "healthy at" not in stop


def test_doctor_s_findings_decide_the_verdict_of_a_model_with_a_fine_ppl(tiny_tokenizer):
    import math

    import torch
    from conftest import make_tiny_model

    from llmprune.engine.recipes.steps import StepAdapters

    model = make_tiny_model()
    fine = StepAdapters._health(model, tiny_tokenizer, ppl=10.5, base_ppl=10.0)
    assert fine["verdict"] == "healthy" and fine["healthy_weights"]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.inf
    broken = StepAdapters._health(model, tiny_tokenizer, ppl=10.5, base_ppl=10.0)
    assert broken["verdict"] == "unhealthy" and not broken["healthy_weights"] and broken["ppl_verdict"] == "healthy"
    assert broken["explanation"].startswith("unhealthy weights: ") and broken["errors"]


def test_skip_finetune_then_rerun_without_it_continues(tmp_path):
    steps = ScriptedSteps()
    report = run_recipe(config_for(tmp_path, skip_finetune=True), steps=steps)
    assert report.status == "done" and "finetune" not in steps.names() and report.row("fine-tuned") is None
    again = ScriptedSteps()
    run_recipe(config_for(tmp_path), steps=again)
    assert again.names() == ["finetune", "final_eval"]


def test_other_settings_in_the_same_run_directory_are_refused(tmp_path):
    run_recipe(config_for(tmp_path, skip_finetune=True), steps=ScriptedSteps())
    changed = config_for(tmp_path, name="base-model-safe-15", seq_len=64, skip_finetune=True)
    with pytest.raises(UserInputError, match="seq_len"):
        run_recipe(changed, steps=ScriptedSteps())
    restarted = ScriptedSteps()
    run_recipe(
        config_for(tmp_path, name="base-model-safe-15", seq_len=64, skip_finetune=True, restart=True), steps=restarted
    )
    assert restarted.names()[:2] == ["baseline", "analyze"]


@pytest.mark.parametrize(
    "kwargs,needle", [({"ratio": 1.5}, "--ratio"), ({"seq_len": 1}, "--seq-len"), ({"name": "a/b"}, "--name")]
)
def test_bad_settings_are_user_errors(tmp_path, kwargs, needle):
    with pytest.raises(UserInputError, match=needle):
        config_for(tmp_path, **kwargs).validate()


def test_a_run_stopped_at_the_gate_continues_with_auto_retreat_on_the_same_command(tmp_path):
    first = ScriptedSteps()
    assert run_recipe(config_for(tmp_path, ratio=0.3), steps=first).status == "stopped_at_gate"
    again = ScriptedSteps()
    report = run_recipe(config_for(tmp_path, ratio=0.3, auto_retreat=True), steps=again)
    assert again.names()[:2] == ["prune", "check"] and again.calls[0] == ("prune", 0.25)  # no new baseline or analysis
    assert report.status == "done" and report.ratio_used == 0.2
    assert [attempt["ratio"] for attempt in report.attempts] == [0.3, 0.25, 0.2]


def test_the_base_model_is_the_teacher_when_it_fits(tmp_path, monkeypatch):
    from llmprune.engine.core import device

    notices = []
    steps = ScriptedSteps()
    report = run_recipe(config_for(tmp_path / "fits"), lambda event: notices.append(event), steps=steps)
    assert report.status == "done" and steps.teacher == "base-model"
    assert any(isinstance(n, Notice) and "distilling from the base model base-model" in n.message for n in notices)

    steps = ScriptedSteps()
    opted_out = RecipeConfig(recipe=get_recipe("safe"), model="base-model", out=str(tmp_path / "off"), teacher=False)
    run_recipe(opted_out, steps=steps)
    assert steps.teacher is None

    monkeypatch.setattr(device, "available_memory_bytes", lambda _device: 1000)  # 1 kB free: nothing fits
    notices.clear()
    steps = ScriptedSteps()
    run_recipe(config_for(tmp_path / "tight"), lambda event: notices.append(event), steps=steps)
    assert steps.teacher is None
    assert any(isinstance(n, Notice) and "does not fit" in n.message for n in notices)


def test_the_recipe_shows_its_fine_tune_memory_plan_before_pruning(tmp_path, tiny_model_dir):
    from llmprune.engine.recipes.steps import StepAdapters

    plan = StepAdapters().finetune_memory_plan(
        RecipeConfig(recipe=get_recipe("safe"), model=str(tiny_model_dir), out=str(tmp_path), seq_len=64)
    )
    assert plan["settings"]["seq_len"] == 64 and plan["settings"]["method"] == "full"
    assert plan["trainable_parameters"] == plan["total_parameters"] > 0

    class PlannedSteps(ScriptedSteps):
        def finetune_memory_plan(self, config):
            self.calls.append(("plan",))
            return {**plan, "fits": False, "fixes": [{"change": "--gradient-checkpointing", "needed_bytes": 1}]}

    events, steps = [], PlannedSteps()
    run_recipe(config_for(tmp_path / "run"), events.append, steps=steps)
    assert steps.calls[0] == ("plan",)  # before the baseline, the analysis and the prune
    warning = next(e for e in events if isinstance(e, Notice) and "memory plan" in e.message)
    assert warning.level == "warning" and "--gradient-checkpointing" in warning.message
