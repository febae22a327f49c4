"""Comparing pruning ratios: one importance analysis, one pruned copy per ratio, one table.

This replaces the shell loop over `--ratio` values followed by grepping the
logs for PPL. The base model is loaded once and each ratio prunes a fresh copy
of it in memory with the same layer scores, so the rows differ only by ratio.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.paths import atomic_write_json
from llmprune.engine.recipes.registry import PipelineSettings, Recipe

StageProgress = Callable[[str, int, int], None]


@dataclass(kw_only=True)
class SweepConfig(PipelineSettings):
    """What `llmprune recipe sweep` does (the results go to <out>/<model>-sweep/)."""

    ratios: list[float]
    """The pruning ratios to compare."""
    recipe: Recipe
    """Where the pruning settings (importance, strategy, alpha, MLP, layer range) come from."""
    importance_config: str | None = None
    """Reuse this layer_importance_config.json instead of measuring importance."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out).expanduser() / f"{self.model_stem()}-sweep"

    def validate(self) -> None:
        if not self.ratios:
            raise UserInputError("no --ratio given", "pass several, e.g. --ratio 0.15 --ratio 0.2 --ratio 0.25")
        bad = [r for r in self.ratios if not (0 < r < 1)]
        if bad:
            raise UserInputError(f"--ratio must be between 0 and 1, got {bad[0]}", "e.g. --ratio 0.15 --ratio 0.2")
        from llmprune.engine.data import check_text_source
        from llmprune.engine.pruning.allocation import PlanOptions

        highest = PlanOptions().max_rate
        if max(self.ratios) > highest:
            raise UserInputError(f"--ratio {max(self.ratios):g} is more than a recipe prunes: at most {highest:g} of every prunable layer",
                                 f"use ratios up to {highest:g}")
        self.validate_budget()
        check_text_source(self.dataset)
        check_text_source(self.eval_dataset, "--eval-dataset")


@dataclass
class SweepRow:
    """One model: the base (ratio 0) or the base pruned at `ratio`."""

    ratio: float
    params: int
    share_removed: float
    ppl: float
    ppl_vs_base: float
    verdict: str


@dataclass
class SweepResult:
    model: str
    rows: list[SweepRow] = field(default_factory=list)
    importance_config: str = ""
    json_path: str = ""
    chart_path: str | None = None  # set by whoever draws the chart (the CLI)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_sweep(config: SweepConfig, progress: StageProgress | None = None) -> SweepResult:
    """Analyse once, prune a copy of the base model at each ratio, measure each; saves sweep.json."""
    from llmprune.engine.pruning.allocation import PlanOptions
    from llmprune.engine.pruning.analysis import check_config_fits, plan_units, read_importance_config
    from llmprune.engine.io.architecture import layer_shapes
    from llmprune.engine.data import load_calibration_windows, load_evaluation_windows
    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.evaluate import perplexity
    from llmprune.engine.diagnose.health import ppl_verdict
    from llmprune.engine.io.models import load_model
    from llmprune.engine.pruning.prune_model import prune_model
    from llmprune.engine.recipes.steps import StepAdapters

    from llmprune.engine.core.outputs import SWEEP_MARKER, check_output_folder, check_writable_location
    from llmprune.engine.diagnose.health import require_healthy, weight_health

    config.validate()
    start = time.perf_counter()
    run_dir = config.run_dir
    check_writable_location(config.out, option="--out")
    check_output_folder(run_dir, option="--out", resumable=True, kind=(SWEEP_MARKER, "layer_importance_config.json"))  # a previous sweep of this model is redone in place
    importance_path = config.importance_config or StepAdapters().analyze(config, run_dir, progress)["importance_config"]
    importance = read_importance_config(importance_path)
    loaded = load_model(config.model, placement=choose_placement(config.device, config.dtype))
    require_healthy(weight_health(loaded.model), "the sweep")
    shapes = layer_shapes(loaded.model)
    check_config_fits(importance, shapes, config.model)
    evaluation = load_evaluation_windows(loaded.tokenizer, config.eval_dataset, config.seq_len, config.eval_windows)
    calibration = load_calibration_windows(loaded.tokenizer, config.dataset, config.calibration_samples, config.seq_len)

    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    base_ppl = perplexity(loaded.model, evaluation, config.batch_size, stage("PPL of the base model")).ppl
    if not math.isfinite(base_ppl):
        from llmprune.engine.core.errors import CheckFailedError

        raise CheckFailedError(f"the base model's perplexity is {base_ppl}: there is no reference to compare the pruned models with",
                               f"check the base model with `llmprune doctor {config.model} --ppl`")
    base_params = loaded.num_parameters
    rows = [SweepRow(0.0, base_params, 0.0, base_ppl, 1.0, "reference")]
    prune = config.recipe.prune
    for ratio in sorted(set(config.ratios)):
        plan = PlanOptions(ratio=ratio, strategy=prune.strategy, alpha=prune.alpha, layer_start=prune.layer_start, layer_end=prune.layer_end)
        _, units = plan_units(importance.scores, shapes, plan, "group", prune.prune_mlp, 1)
        model = copy.deepcopy(loaded.model)  # every ratio starts from the same base weights
        outcome = prune_model(model, units, calibration, batch_size=config.batch_size)
        ppl = perplexity(model, evaluation, config.batch_size, stage(f"PPL at ratio {ratio:g}")).ppl
        del model
        rows.append(SweepRow(ratio, outcome.params_after, outcome.removed_share, ppl,
                             ppl / base_ppl if math.isfinite(ppl) else math.inf, ppl_verdict(ppl, base_ppl).label))
    result = SweepResult(model=config.model, rows=rows, importance_config=str(importance_path),
                         json_path=str(run_dir / "sweep.json"), seconds=time.perf_counter() - start)
    save_sweep_json(result)
    return result


def save_sweep_json(result: SweepResult) -> None:
    """(Re)write sweep.json, e.g. once the chart's path is known."""
    atomic_write_json(result.json_path, result.to_dict())
