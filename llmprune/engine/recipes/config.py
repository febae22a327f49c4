"""What a recipe run (and a ratio sweep) is asked to do: the settings besides the recipe itself.

Kept apart from the runner so that the steps and the report can read the
config without importing the runner that calls them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from llmprune.engine.core.errors import require
from llmprune.engine.io.load_options import LoadOptions
from llmprune.engine.recipes.registry import RECIPE_FINETUNE_FLAGS, Recipe
from llmprune.engine.tasks import TaskOptions, task_names

# run-directory entries written by the steps (a --restart removes exactly these)
OUTPUTS = ("analysis", "pruned", "prune_log", "finetune", "model.gguf", "state.json", "report.json", "report.txt")
EXPORT_FORMATS = ("gguf",)


@dataclass(kw_only=True)
class PipelineSettings(LoadOptions):
    """What a recipe run (or a ratio sweep) needs besides the recipe: the model (LoadOptions), the text and the
    budget."""

    out: str = "llmprune-runs"
    """Folder that holds the run directories."""
    dataset: str = "wikitext2"
    """Calibration and training text (its training split)."""
    eval_dataset: str = "wikitext2"
    """Evaluation text (its test split)."""
    seq_len: int = 256
    """Tokens per window, for calibration, evaluation and training."""
    calibration_samples: int = 32
    """Calibration windows (layer importance and the choice of units)."""
    eval_windows: int | None = 64
    """Evaluation windows per PPL (None: the whole split)."""
    batch_size: int = 8
    """Windows per forward pass when measuring."""
    allocation: str = "plan"
    """How much each layer loses, as `prune --allocation`: plan (the recipe's layer-importance plan) | global
    (units ranked across all layers) | search (levels searched against KL to the dense model)."""
    search_budget: str | None = None
    """With --allocation search: how long it searches (20m, 90s, or tokens: 2M); default as on prune."""
    search_dataset: str | None = None
    """With --allocation search: the text it selects on, like what the model will serve; default --dataset."""
    save_dtype: str = "auto"
    """dtype of the saved models (pruned, fine-tuned): auto keeps the source's stored dtype (bf16 in -> bf16 out) |
    float32 | bfloat16 | float16.
    """

    def model_stem(self) -> str:
        """The model's name as a folder name: smollm2-135m, or a directory's/file's own name."""
        stem = Path(self.model.rstrip("/")).name.removesuffix(".gguf") or "model"
        return re.sub(r"[^\w.+-]+", "-", stem).strip("-") or "model"

    def validate_budget(self) -> None:
        require(self.seq_len >= 2, f"--seq-len must be ≥ 2, got {self.seq_len}", "use e.g. --seq-len 256")
        for option, value in (("--importance-samples", self.calibration_samples), ("--batch-size", self.batch_size)):
            require(value >= 1, f"{option} must be ≥ 1, got {value}", f"use a positive {option}")
        require(
            self.eval_windows is None or self.eval_windows >= 1,
            f"--eval-windows must be ≥ 1, got {self.eval_windows}",
            "use e.g. 64",
        )
        from llmprune.engine.data import check_text_source

        check_text_source(self.dataset)
        check_text_source(self.eval_dataset, "--eval-dataset")
        from llmprune.engine.pruning.config import ALLOCATIONS, parse_search_budget

        require(
            self.allocation in ALLOCATIONS,
            f"unknown --allocation '{self.allocation}'",
            f"use one of {', '.join(ALLOCATIONS)}",
        )
        if self.search_budget is not None:
            require(
                self.allocation == "search",
                "--search-budget is only used by --allocation search",
                "add --allocation search, or leave --search-budget out",
            )
            parse_search_budget(self.search_budget)
        if self.search_dataset is not None:
            require(
                self.allocation == "search",
                "--search-dataset is only used by --allocation search",
                "add --allocation search, or leave --search-dataset out",
            )
            check_text_source(self.search_dataset, "--search-dataset")

    def validate_pruning(self, ratios: list[float]) -> None:
        """The recipe's pruning settings, in the recipe's own option names, before anything runs."""
        from llmprune.engine.pruning.allocate.plan_options import STRATEGIES, PlanOptions
        from llmprune.engine.pruning.scores.layers import get_layer_score

        prune = self.recipe.prune
        highest = PlanOptions().max_rate  # no prunable layer loses more than this, so neither can their mean
        require(
            max(ratios) <= highest,
            f"--ratio {max(ratios):g} is more than a recipe prunes: at most {highest:g} of every prunable layer",
            f"use --ratio {highest:g} or lower",
        )
        require(
            prune.strategy in STRATEGIES,
            f"unknown --pruning-strategy '{prune.strategy}'",
            f"use one of {', '.join(STRATEGIES)}",
        )
        get_layer_score(prune.importance)
        require(
            math.isfinite(prune.alpha) and prune.alpha >= 0,
            f"--alpha must be a finite number ≥ 0, got {prune.alpha}",
            "use e.g. --alpha 4 (0: uniform)",
        )
        require(
            prune.layer_start >= 0, f"--layer-start must be ≥ 0, got {prune.layer_start}", "use e.g. --layer-start 1"
        )


@dataclass(kw_only=True)
class RecipeConfig(PipelineSettings):
    """What `llmprune recipe NAME` does: a recipe (with overrides), the model, the text and the budget."""

    recipe: Recipe
    """The recipe with any overridden values already applied."""
    name: str | None = None
    """Run directory name under `out` (default: <model>-<recipe>-<ratio %>)."""
    skip_finetune: bool = False
    """Stop after the gate (the pruned model is the result)."""
    teacher: bool = True
    """Distil from the base model (finetune --teacher) when it fits in memory next to the student; False: LM loss only.
    """
    auto_retreat: bool = False
    """When the gate fails, re-prune at a lower ratio instead of stopping."""
    retreat_step: float = 0.05
    """How much lower each retreat prunes."""
    min_ratio: float = 0.05
    """The auto-retreat gives up below this ratio."""
    restart: bool = False
    """Discard a previous run in the same directory instead of resuming it."""
    tasks: str | None = None
    """Also score the base, pruned and fine-tuned models on these lm-eval tasks (comma-separated, e.g.
    arc_easy,hellaswag; needs the lm-eval extra).
    """
    include_path: str | None = None
    """Folder of local lm-eval task YAML files (with --tasks)."""
    task_limit: float | None = None
    """Only the first N examples of each task (a fraction if < 1; quick checks only)."""
    export: str | None = None
    """Also write the final model (fine-tuned, else pruned) as OUT/<run>/model.gguf (f16) for llama.cpp: gguf."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out).expanduser() / (
            self.name or f"{self.model_stem()}-{self.recipe.name}-{self.recipe.prune.ratio * 100:g}"
        )

    def settings(self) -> dict:
        """The values that decide the run's outputs: a rerun resumes only when they are unchanged.

        Left out on purpose: skip_finetune and auto_retreat (rerunning without them continues
        the run), restart, and the device (a run may be resumed on another machine).
        """
        keep = (
            "model",
            "dataset",
            "eval_dataset",
            "seq_len",
            "calibration_samples",
            "eval_windows",
            "batch_size",
            "retreat_step",
            "min_ratio",
        )
        settings = {"recipe": self.recipe.to_dict(), **{name: getattr(self, name) for name in keep}}
        settings["recipe"]["finetune"]["teacher"] = self.teacher  # where the state of earlier runs records it
        if self.tasks is not None:  # only when asked, so that runs made before --tasks existed still resume
            settings["tasks"] = self.task_options().to_dict()
        return settings

    def task_options(self) -> TaskOptions | None:
        """The lm-eval tasks to score each model on (None: perplexity only); the measuring batch size is theirs too."""
        if self.tasks is None:
            return None
        return TaskOptions(
            task_names(self.tasks), include_path=self.include_path, limit=self.task_limit, batch_size=self.batch_size
        )

    def validate(self) -> None:
        self.validate_budget()
        if self.tasks is not None:
            self.task_options().validate()
        prune, finetune = self.recipe.prune, self.recipe.finetune
        require(0 < prune.ratio < 1, f"--ratio must be between 0 and 1, got {prune.ratio}", "use e.g. --ratio 0.15")
        self.validate_pruning([prune.ratio])
        finetune.validate_training(RECIPE_FINETUNE_FLAGS)
        require(
            0 < self.retreat_step < 1,
            f"--retreat-step must be between 0 and 1, got {self.retreat_step}",
            "use e.g. 0.05",
        )
        require(
            0 < self.min_ratio <= prune.ratio,
            f"--min-ratio must be in (0, {prune.ratio}], got {self.min_ratio}",
            "use e.g. 0.05",
        )
        require(
            self.export in (None, *EXPORT_FORMATS),
            f"--export must be one of {', '.join(EXPORT_FORMATS)}, got '{self.export}'",
            "use --export gguf",
        )
        if self.name is not None:
            require(
                bool(re.fullmatch(r"[\w.+-]+", self.name)),
                f"--name '{self.name}' is not a plain folder name",
                "use letters, digits, - _ . +",
            )
