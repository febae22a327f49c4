"""Running a recipe: baseline → analyze → prune → check → gate → finetune → final eval → report.

Each step reads what earlier steps recorded in `state.json` and records its
own result there once its outputs are on disk, so a rerun of the same command
skips what is done. The gate stops the run before fine-tuning when the pruned
model's PPL verdict is "too high" or "broken" (or its weights are unhealthy):
fine-tuning a broken model wastes hours and usually ends in NaN. With
`auto_retreat` the gate instead re-prunes at a lower ratio, reusing the
importance analysis, until the verdict passes or `min_ratio` is reached.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprune.engine.core.outputs import RECIPE_MARKER, check_output_folder, check_writable_location
from llmprune.engine.core.progress import StageProgress
from llmprune.engine.recipes.config import OUTPUTS, RecipeConfig
from llmprune.engine.recipes.report import RecipeReport, build_report, write_report
from llmprune.engine.recipes.state import RunState, describe_resume, open_run
from llmprune.engine.recipes.steps import (
    PASSING_VERDICTS,
    UNHEALTHY,
    StepAdapters,
    choose_teacher,
    finished_finetune,
    has_checkpoint,
)

# step name -> what it does (in the order they run)
STEPS: dict[str, str] = {
    "baseline": "measure the base model (PPL, size)",
    "analyze": "layer importance on calibration samples",
    "prune": "structured pruning at the ratio in force",
    "check": "PPL, doctor's checks and the PPL verdict of the pruned model",
    "gate": "continue only if the verdict is healthy or acceptable",
    "finetune": "recovery fine-tuning of the pruned model",
    "final_eval": "PPL and verdict of the fine-tuned model",
    "export": "GGUF file of the final model for llama.cpp",
}
FINETUNE_STEPS = ("finetune", "final_eval")


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class StepStarted:
    step: str
    description: str


@dataclass(frozen=True)
class StepFinished:
    step: str
    seconds: float
    summary: str


@dataclass(frozen=True)
class StepSkipped:
    step: str
    reason: str  # "done in an earlier run" | "--skip-finetune"


@dataclass(frozen=True)
class Notice:
    """Something the user should read: resuming, a retreat, the gate's decision."""

    message: str
    level: str = "info"  # info | warning | error


RecipeListener = Callable[[Any], None]


# ---------------------------------------------------------------- the runner


class _Stop(Exception):
    """Raised by a step to end the run early (the state says why)."""


class _Retry(Exception):
    """Raised by the gate to run the pipeline again from `step` (the auto-retreat)."""

    def __init__(self, step: str):
        self.step = step


def _retreat_ratios(start: float, step: float, floor: float) -> list[float]:
    ratios, ratio = [], start
    while ratio - step >= floor - 1e-9:
        ratio = round(ratio - step, 4)
        ratios.append(ratio)
    return ratios


class _Run:
    """One execution of the pipeline over a RunState."""

    def __init__(
        self,
        config: RecipeConfig,
        state: RunState,
        steps: StepAdapters,
        emit: RecipeListener,
        finetune_listener: RecipeListener | None,
        finetune_host: Callable[..., Any] | None,
        progress: StageProgress | None,
    ):
        self.config, self.state, self.steps, self.emit, self.progress = config, state, steps, emit, progress
        self.finetune_listener, self.finetune_host = finetune_listener, finetune_host

    @property
    def run_dir(self) -> Path:
        return self.state.run_dir

    def baseline(self) -> dict:
        """The reference: only a healthy base model with a finite PPL can be one (nothing is pruned otherwise)."""
        result = self.steps.evaluate(self.config.model, self.config, health=True, progress=self.progress)
        problems = (
            [error.get("message", str(error)) for error in result.get("errors", [])]
            if not result.get("healthy_weights", True)
            else []
        )
        if not math.isfinite(result["ppl"]):
            problems.append(f"its perplexity is {result['ppl']} (no finite reference to compare the pruned model with)")
        if problems:
            self.state.status = "base_unhealthy"
            self.emit(
                Notice(
                    f"stopped before pruning: the base model {self.config.model} is not healthy: "
                    + "; ".join(problems[:3])
                    + f"; check it with `llmprune doctor {self.config.model}`",
                    "error",
                )
            )
            raise _Stop()
        return {key: value for key, value in result.items() if key not in ("verdict", "explanation", "advice")}

    def analyze(self) -> dict:
        return self.steps.analyze(self.config, self.run_dir / "analysis", self.progress)

    def prune(self) -> dict:
        importance = self.state.result("analyze")["importance_config"]
        return {
            "ratio": self.state.ratio,
            **self.steps.prune(self.config, importance, self.state.ratio, self.run_dir / "pruned", self.progress),
        }

    def check(self) -> dict:
        base_ppl = self.state.result("baseline")["ppl"]
        result = self.steps.evaluate(
            str(self.run_dir / "pruned"), self.config, base_ppl=base_ppl, health=True, progress=self.progress
        )
        result["ratio"] = self.state.ratio
        self.state.attempts.append(
            {key: result.get(key) for key in ("ratio", "params", "ppl", "verdict", "healthy_weights")}
        )
        return result

    def gate(self) -> dict:
        check = self.state.result("check")
        healthy_weights = check.get("healthy_weights", True)
        passed = check["verdict"] in PASSING_VERDICTS and healthy_weights
        # one verdict, one word: weights that fail doctor's check decide it (older state.json files kept the PPL's)
        why = check["verdict"]
        if not healthy_weights:
            errors = check.get("errors") or [{}]
            why = f"{UNHEALTHY} (its weights fail doctor's check: {errors[0].get('message', 'see llmprune doctor')})"
        if passed:
            self.emit(
                Notice(f"gate passed at ratio {self.state.ratio:g}: the pruned model's verdict is {check['verdict']}")
            )
            return {"passed": True, "ratio": self.state.ratio, "verdict": check["verdict"]}
        lower = _retreat_ratios(self.state.ratio, self.config.retreat_step, self.config.min_ratio)
        if self.config.auto_retreat and lower:
            message = (
                f"ratio {self.state.ratio:g} gave a model that is {why} (PPL {check['ppl']:.2f}); re-pruning at"
                f" {lower[0]:g} with the same importance analysis"
            )
            self.state.retreats.append(message)
            self.emit(Notice(message, "warning"))
            self.state.ratio = lower[0]
            self.state.forget("prune", "check")
            raise _Retry("prune")
        self.state.status = "stopped_at_gate"
        gave_up = " (the auto-retreat reached --min-ratio)" if self.config.auto_retreat else ""
        self.emit(
            Notice(
                f"stopped at the gate: the pruned model is {why} at ratio {self.state.ratio:g}{gave_up}; nothing was"
                " fine-tuned",
                "error",
            )
        )
        raise _Stop()

    def finetune(self) -> dict:
        out = self.run_dir / "finetune"
        teacher, why = choose_teacher(
            self.config, self.state.result("baseline")["params"], self.state.result("check")["params"], out
        )
        self.emit(Notice(why))
        result = finished_finetune(out)
        if result is not None:  # it ended after this recipe had stopped waiting for it (an earlier, orphaned process)
            self.emit(Notice(f"the fine-tune in {out} had finished ({result['steps']} steps): its model is used"))
        else:
            result = self.steps.finetune(
                self.config,
                str(self.run_dir / "pruned"),
                out,
                has_checkpoint(out),
                self.finetune_listener,
                self.finetune_host,
                teacher=teacher,
            )
        result.update(teacher=teacher, teacher_choice=why)
        if result["status"] == "stopped_by_user":
            self.state.status = "interrupted"
            self.emit(
                Notice(
                    "fine-tuning stopped by the user; run the same command again to resume from its last checkpoint",
                    "warning",
                )
            )
            raise _Stop()
        if result["status"] != "completed" or not result.get("model_dir"):
            self.state.status = "finetune_failed"
            self.emit(
                Notice(f"fine-tuning did not complete ({result['status']}): {result.get('message', '')}", "error")
            )
            raise _Stop()
        return result

    def final_eval(self) -> dict:
        model_dir = self.state.result("finetune")["model_dir"]
        base_ppl = self.state.result("baseline")["ppl"]
        return self.steps.evaluate(model_dir, self.config, base_ppl=base_ppl, health=True, progress=self.progress)

    def export(self) -> dict:
        finetuned = self.state.result("finetune") if self.state.done("finetune") else None
        model_dir = finetuned["model_dir"] if finetuned else str(self.run_dir / "pruned")
        return self.steps.export_gguf(model_dir, self.run_dir / "model.gguf")


def _summary(step: str, result: dict) -> str:
    if "ppl" in result:
        verdict = f", {result['verdict']}" if "verdict" in result else ""
        return f"PPL {result['ppl']:.2f}{verdict}, {result['params']:,} parameters"
    if step == "prune":
        return (
            f"ratio {result['ratio']:g}: {result['params']:,} parameters, {result['share_removed']:.1%} of all removed"
        )
    if step == "analyze":
        return f"{result['method']} importance of {len(result['scores'])} layers → {result['importance_config']}"
    if step == "export":
        return f"{result['architecture']} GGUF, {result['bytes'] / 2**20:,.1f} MiB → {result['gguf']}"
    if step == "gate":
        return f"passed ({result['verdict']})"
    if step == "finetune":
        loss = f"{result['final_loss']:.4f}" if result.get("final_loss") is not None else "—"
        return f"{result['steps']} steps, final loss {loss} → {result['model_dir']}"
    return ", ".join(f"{key} {value}" for key, value in result.items())


def _restart(run_dir: Path) -> None:
    for name in OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _announce_memory_plan(run: _Run) -> None:
    """Before pruning: will the fine-tune step fit? (the plan on the base model's shape, an upper bound)."""
    plan_of = getattr(run.steps, "finetune_memory_plan", None)
    plan = plan_of(run.config) if plan_of is not None else None
    if plan is None:
        return
    gib = 2**30
    free = "unknown" if plan["available_bytes"] is None else f"{plan['available_bytes'] / gib:.1f} GiB"
    message = (
        f"fine-tune memory plan ({plan['settings']['method']}, on the base model's shape: an upper bound):"
        f" {plan['needed_bytes'] / gib:.1f} GiB of {plan['where']} ({free} free)"
    )
    if plan["fits"]:
        run.emit(Notice(message + ": fits"))
        return
    fixes = "; ".join(fix["change"] for fix in plan["fixes"]) or "a device with more memory"
    run.emit(Notice(f"{message}: does not fit; would fit: {fixes}", "warning"))


def run_recipe(
    config: RecipeConfig,
    listener: RecipeListener | None = None,
    *,
    steps: StepAdapters | None = None,
    finetune_listener: RecipeListener | None = None,
    finetune_host: Callable[..., Any] | None = None,
    progress: StageProgress | None = None,
) -> RecipeReport:
    """Run (or resume) the recipe; returns the final report, also saved as report.json/.txt in the run directory.

    `listener` receives StepStarted/StepFinished/StepSkipped/Notice events;
    `finetune_listener` the fine-tuning events (finetune's own event types);
    `finetune_host(run)` may run the training elsewhere, e.g. under the dashboard,
    where `run(listener, control)` starts it and returns finetune's result;
    `progress(stage, done, total)` follows the long loops inside the steps.
    """
    config.validate()
    check_writable_location(config.out, option="--out")
    check_output_folder(config.run_dir, option="--out/--name", resumable=True, kind=RECIPE_MARKER)
    emit = listener or (lambda event: None)
    if config.restart:
        _restart(config.run_dir)
    state = open_run(config.run_dir, config.settings())
    if state.ratio is None:
        state.ratio = config.recipe.prune.ratio
    state.status = "running"
    resuming = describe_resume(state, list(STEPS))
    if resuming:
        emit(Notice(resuming))
    run = _Run(config, state, steps or StepAdapters(), emit, finetune_listener, finetune_host, progress)
    if not (config.skip_finetune or state.done("finetune")):
        _announce_memory_plan(run)
    order = list(STEPS)
    index = 0
    try:
        while index < len(order):
            step = order[index]
            index += 1
            if step in FINETUNE_STEPS and config.skip_finetune:
                emit(StepSkipped(step, "--skip-finetune"))
                continue
            if step == "export" and config.export is None:
                continue
            if state.done(step):
                emit(StepSkipped(step, "done in an earlier run"))
                continue
            emit(StepStarted(step, STEPS[step]))
            start = time.perf_counter()
            try:
                result = getattr(run, step)()
            except _Retry as retry:
                index = order.index(retry.step)
                continue
            state.finish(step, result, time.perf_counter() - start)
            emit(StepFinished(step, state.seconds(step), _summary(step, result)))
        state.status = "done"
    except _Stop:
        pass
    except KeyboardInterrupt:
        state.status = "interrupted"
        raise
    except BaseException as error:  # bad input found by a step, a full disk, a bug: the state must not say "running"
        state.status = "failed"
        state.error = getattr(error, "problem", None) or f"{type(error).__name__}: {str(error).strip()[:300]}"
        raise
    finally:
        state.save()
    report = build_report(config, state)
    write_report(report, state.run_dir)
    return report
