"""The final report of a recipe run: base / pruned / fine-tuned side by side.

Saved next to the models as `report.json` (for scripts) and `report.txt` (the
same table in plain text), whatever way the run ended: a run stopped at the
gate reports why and what to do instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmprune.engine.core.paths import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from llmprune.engine.recipes.config import RecipeConfig
    from llmprune.engine.recipes.state import RunState

STATUS_TEXT = {
    "done": "finished",
    "stopped_at_gate": "stopped at the gate: the pruned model was not fine-tuned",
    "interrupted": "interrupted: run the same command again to resume",
    "finetune_failed": "fine-tuning stopped on a guard: see the fine-tuning run's log",
    "running": "incomplete: run the same command again to resume",
    "base_unhealthy": "stopped before pruning: the base model is not healthy (see llmprune doctor)",
    "failed": "failed: see the error; fix it and run the same command again",
}


@dataclass
class ModelRow:
    """One model of the run. `seconds` is the time spent producing and measuring it."""

    stage: str  # base | pruned | fine-tuned
    path: str
    params: int
    share_removed: float  # of the base model's parameters
    ppl: float
    ppl_vs_base: float | None
    verdict: str
    seconds: float
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # lm-eval task -> metric -> value


@dataclass
class RecipeReport:
    recipe: str
    run_dir: str
    status: str
    ratio_asked: float
    ratio_used: float | None
    rows: list[ModelRow] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    retreats: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    prune_path: dict = field(default_factory=dict)
    """The path the prune step took and why (route.PrunePath), as in the pruned model's llmprune.json."""
    total_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "status_text": STATUS_TEXT.get(self.status, self.status)}

    def row(self, stage: str) -> ModelRow | None:
        return next((row for row in self.rows if row.stage == stage), None)


def _gate_advice(config: RecipeConfig, state: RunState, check: dict) -> list[str]:
    """What to do when the gate stopped the run, in this recipe's own options."""
    prune = config.recipe.prune
    ratio = state.ratio or prune.ratio
    advice = [check["explanation"]] if check.get("explanation") else []
    lower = max(round(ratio - config.retreat_step, 4), config.min_ratio)
    advice.append(
        f"prune less: --ratio {lower:g}"
        + ("" if config.auto_retreat else ", or --auto-retreat to let the recipe find a ratio that passes")
    )
    if prune.prune_mlp:
        advice.append(f"leave the MLP alone: llmprune recipe attn-only --ratio {ratio:g}")
    layers = len(state.result("analyze").get("scores", []))
    if layers:
        end = (layers - 1 if prune.layer_end is None else prune.layer_end) - 1
        advice.append(f"protect more layers at both ends: --layer-start {prune.layer_start + 1} --layer-end {end}")
    advice += [f"doctor: {error.get('message', error)}" for error in check.get("errors", [])]
    return advice


def build_report(config: RecipeConfig, state: RunState) -> RecipeReport:
    baseline, check, final = state.result("baseline"), state.result("check"), state.result("final_eval")
    rows: list[ModelRow] = []
    base_params, base_ppl = baseline.get("params"), baseline.get("ppl")

    def add(stage: str, result: dict, path: str, seconds: float) -> None:
        if not result:
            return
        ratio = result["ppl"] / base_ppl if base_ppl and math.isfinite(result["ppl"]) else None
        share = 1 - result["params"] / base_params if base_params else 0.0
        rows.append(
            ModelRow(
                stage,
                path,
                result["params"],
                share,
                result["ppl"],
                ratio,
                result.get("verdict", "reference"),
                seconds,
                result.get("tasks", {}),
            )
        )

    add("base", baseline, config.model, state.seconds("baseline"))
    add("pruned", check, str(state.run_dir / "pruned"), sum(state.seconds(s) for s in ("analyze", "prune", "check")))
    add(
        "fine-tuned",
        final,
        state.result("finetune").get("model_dir", ""),
        state.seconds("finetune") + state.seconds("final_eval"),
    )
    advice = _gate_advice(config, state, check) if state.status == "stopped_at_gate" else []
    return RecipeReport(
        recipe=config.recipe.name,
        run_dir=str(state.run_dir),
        status=state.status,
        ratio_asked=config.recipe.prune.ratio,
        ratio_used=state.ratio if state.done("prune") else None,
        rows=rows,
        attempts=list(state.attempts),
        retreats=list(state.retreats),
        advice=advice,
        settings=state.settings,
        prune_path=state.result("prune").get("path") or {},
        total_seconds=sum(step.get("seconds", 0.0) for step in state.steps.values()),
    )


def _format_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return str(int(n))


def _format_ppl(ppl: float) -> str:
    return f"{ppl:,.2f}" if math.isfinite(ppl) else "inf"


def report_table(report: RecipeReport) -> list[list[str]]:
    """The report's rows as text cells (header first); shared by the text file and the terminal.

    With lm-eval tasks, one column per task after the fixed ones: its `acc` (the JSON report has every metric).
    """
    tasks = list(dict.fromkeys(task for row in report.rows for task in row.tasks))
    table = [["model", "params", "removed", "PPL", "× base", "verdict", "time", *(f"{task} acc" for task in tasks)]]
    for row in report.rows:
        table.append(
            [
                row.stage,
                _format_count(row.params),
                f"{row.share_removed:.1%}",
                _format_ppl(row.ppl),
                f"{row.ppl_vs_base:.2f}" if row.ppl_vs_base is not None else "—",
                row.verdict,
                f"{row.seconds:,.0f} s",
                *(_format_acc(row.tasks.get(task, {}).get("acc")) for task in tasks),
            ]
        )
    return table


def _format_acc(acc: float | None) -> str:
    return "—" if acc is None else f"{acc:.3f}"


def report_text(report: RecipeReport) -> str:
    table = report_table(report)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        f"llmprune recipe {report.recipe} — {STATUS_TEXT.get(report.status, report.status)}",
        f"run: {report.run_dir}",
        "",
    ]
    for number, line in enumerate(table):
        lines.append(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=False))
            )
        )
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    if report.ratio_used is not None:
        used = f"{report.ratio_used:g}" + (
            f" (asked {report.ratio_asked:g})" if report.ratio_used != report.ratio_asked else ""
        )
        lines += ["", f"pruning ratio: {used}"]
    lines += [f"auto-retreat: {message}" for message in report.retreats]
    if report.advice:
        lines += ["", "what to do:"] + [f"  - {item}" for item in report.advice]
    lines += ["", f"total time: {report.total_seconds:,.0f} s"]
    return "\n".join(lines) + "\n"


def write_report(report: RecipeReport, run_dir: Path) -> None:
    atomic_write_json(run_dir / "report.json", report.to_dict())
    atomic_write_text(run_dir / "report.txt", report_text(report))
