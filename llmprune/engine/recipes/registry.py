"""Recipes as data: the proven pruning paths, each a frozen record of its values.

A recipe says *what* to do (ratio, importance, allocation, MLP or not, how to
fine-tune); `recipe_run.run_recipe` says *how* (the ordered steps, the gate,
resuming). Adding a recipe is one more `Recipe(...)` in `RECIPES`; every
value can still be overridden from the command line.

The values come from the field guide: at 15 % with MLP pruning a very low
learning rate (5e-7) and clipping at 0.5 keep the recovery from diverging;
attention-only pruning at 20 % is gentler on the model and tolerates 1e-6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.pruning.allocate.plan_options import plan_default
from llmprune.engine.pruning.scores.layers import DEFAULT_LAYER_SCORE


@dataclass(frozen=True)
class PruneSettings:
    """How the model is analysed and pruned."""

    ratio: float
    """Fraction of the prunable structures removed (attention groups, and MLP channels when `prune_mlp`)."""
    importance: str = DEFAULT_LAYER_SCORE
    """Layer importance criterion of the analysis (removal: how much the output changes when the layer is skipped)."""
    strategy: str = plan_default("strategy")
    """How per-layer rates follow the scores (inverse: important layers are pruned less)."""
    alpha: float = plan_default("alpha")
    """Strength of the non-uniformity of the inverse strategy."""
    prune_mlp: bool = True
    """Prune MLP channels too (False: attention groups only)."""
    layer_start: int = plan_default("layer_start")
    """First prunable layer: the layers before it are protected."""
    layer_end: int | None = plan_default("layer_end")
    """One past the last prunable layer (None: all but the last layer, which stays protected)."""


@dataclass(frozen=True)
class FinetuneSettings:
    """How the pruned model is brought back."""

    lr: float
    """Peak learning rate."""
    epochs: int = 2
    """Passes over the training samples."""
    samples: int = 1000
    """Training windows."""
    method: str = "full"
    """full or lora."""
    batch_size: int = 1
    """Windows per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    teacher: bool = True
    """Distil from the base model (finetune --teacher) when it fits in memory next to the student; False: LM loss only.
    """


@dataclass(frozen=True)
class Recipe:
    """One named pipeline: prune like this, then fine-tune like that."""

    name: str
    summary: str
    prune: PruneSettings
    finetune: FinetuneSettings

    def with_overrides(self, prune: dict[str, Any] | None = None, finetune: dict[str, Any] | None = None) -> Recipe:
        """A copy with some values replaced; None values mean 'keep the recipe's'."""
        prune = {k: v for k, v in (prune or {}).items() if v is not None}
        finetune = {k: v for k, v in (finetune or {}).items() if v is not None}
        return replace(self, prune=replace(self.prune, **prune), finetune=replace(self.finetune, **finetune))

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="safe",
            summary=(
                "the conservative path: 15 % of attention groups and MLP channels, layer-removal importance, "
                "inverse allocation, then a very gentle full fine-tune"
            ),
            prune=PruneSettings(ratio=0.15, importance="removal", strategy="inverse", alpha=1.2, prune_mlp=True),
            finetune=FinetuneSettings(
                lr=5e-7, epochs=2, samples=1000, grad_accum=4, max_grad_norm=0.5, warmup_steps=50
            ),
        ),
        Recipe(
            name="attn-only",
            summary="the safer path: 20 % of attention groups only (MLP untouched), then a full fine-tune",
            prune=PruneSettings(ratio=0.20, alpha=1.2, prune_mlp=False),
            finetune=FinetuneSettings(lr=1e-6, epochs=2, samples=1000),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserInputError(
            f"unknown recipe '{name}'", f"use one of {', '.join(RECIPES)} (llmprune recipe --list shows them)"
        )
    return RECIPES[name]
