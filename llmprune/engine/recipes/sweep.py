"""Comparing pruning ratios: one importance analysis, one pruned copy per ratio, one table.

This replaces the shell loop over `--ratio` values followed by grepping the
logs for PPL. The base model is loaded once and each ratio prunes a fresh copy
of it in memory with the same layer scores, so the rows differ only by ratio.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.paths import atomic_write_json
from llmprune.engine.core.progress import StageProgress, named_stage
from llmprune.engine.recipes.config import PipelineSettings
from llmprune.engine.recipes.registry import Recipe


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
        self.validate_pruning(self.ratios)
        self.validate_budget()


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
    """Analyse once, prune a copy of the base model at each ratio exactly as the recipe's prune step does, measure each.

    Each row goes through `run_prune` with the PruneConfig the recipe builds
    (`steps.recipe_prune_config`), so a row predicts `recipe NAME --ratio r`.
    Saves sweep.json (and each prune's run log under prune_log/).
    """
    from llmprune.engine.core.errors import CheckFailedError
    from llmprune.engine.core.outputs import SWEEP_MARKER, check_output_folder, check_writable_location
    from llmprune.engine.data import check_seq_len_fits, load_evaluation_windows
    from llmprune.engine.diagnose.health import ppl_verdict, require_healthy, weight_health
    from llmprune.engine.evaluate import perplexity
    from llmprune.engine.pruning.pipeline import run_prune
    from llmprune.engine.recipes.steps import StepAdapters, recipe_prune_config

    config.validate()
    start = time.perf_counter()
    run_dir = config.run_dir
    check_writable_location(config.out, option="--out")
    # a previous sweep of this model is redone in place; anything else there is left alone
    check_output_folder(run_dir, option="--out", resumable=True, kind=(SWEEP_MARKER, "layer_importance_config.json"))
    base = config.load_options().load()
    check_seq_len_fits(config.seq_len, base.model)
    require_healthy(weight_health(base.model), "the sweep")  # the analysis and the prunes below trust this check
    importance_path = config.importance_config or StepAdapters().analyze(config, run_dir, progress)["importance_config"]
    evaluation = load_evaluation_windows(base.tokenizer, config.eval_dataset, config.seq_len, config.eval_windows)
    base_ppl = perplexity(base.model, evaluation, config.batch_size, named_stage(progress, "PPL of the base model")).ppl
    if not math.isfinite(base_ppl):
        raise CheckFailedError(
            f"the base model's perplexity is {base_ppl}: there is no reference to compare the pruned models with",
            f"check the base model with `llmprune doctor {config.model} --ppl`",
        )
    rows = [SweepRow(0.0, base.num_parameters, 0.0, base_ppl, 1.0, "reference")]
    for ratio in sorted(set(config.ratios)):
        pruned = replace(base, model=copy.deepcopy(base.model))  # every ratio starts from the same base weights
        prune_config = recipe_prune_config(
            config, importance_path, ratio, log_dir=run_dir / "prune_log", log_name=f"ratio-{ratio:g}"
        )
        result = run_prune(prune_config, progress, loaded=pruned)
        ppl = perplexity(
            pruned.model, evaluation, config.batch_size, named_stage(progress, f"PPL at ratio {ratio:g}")
        ).ppl
        del pruned, result.loaded
        rows.append(
            SweepRow(
                ratio,
                result.params_after,
                result.removed_share,
                ppl,
                ppl / base_ppl if math.isfinite(ppl) else math.inf,
                ppl_verdict(ppl, base_ppl).label,
            )
        )
    result = SweepResult(
        model=config.model,
        rows=rows,
        importance_config=str(importance_path),
        json_path=str(run_dir / "sweep.json"),
        seconds=time.perf_counter() - start,
    )
    save_sweep_json(result)
    return result


def save_sweep_json(result: SweepResult) -> None:
    """(Re)write sweep.json, e.g. once the chart's path is known."""
    atomic_write_json(result.json_path, result.to_dict())
