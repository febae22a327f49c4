"""Options shared by `recipe NAME` and `recipe sweep`, generated from the settings dataclasses."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Annotated

import typer

from llmprune.cli.common import BaseModelOpt, DeviceOpt, DtypeOpt, OptionalModelArg, TrustPickleOpt
from llmprune.cli.settings_options import settings_parameters

if TYPE_CHECKING:
    from llmprune.engine.recipes.registry import Recipe

LOAD_FIELDS = ("model", "base_model", "trust_pickle", "device", "dtype")


def recipe_option_parameters(recipe: Recipe | None = None) -> list[inspect.Parameter]:
    """The options of `recipe NAME` (and, without a recipe, the sweep's overrides), from the settings dataclasses."""
    from llmprune.engine.finetune.config import FinetuneConfig
    from llmprune.engine.recipes.registry import RECIPE_FINETUNE_FIELDS, RECIPE_FINETUNE_FLAGS, PruneSettings

    if recipe is None:
        return settings_parameters(PruneSettings, prefix="prune__", skip=("ratio",), optional=True)
    return settings_parameters(PruneSettings, recipe.prune, prefix="prune__") + settings_parameters(
        FinetuneConfig,
        recipe.finetune,
        prefix="finetune__",
        only=RECIPE_FINETUNE_FIELDS,
        renamed=RECIPE_FINETUNE_FLAGS,
    )


def load_parameters(model_as_option: bool) -> list[inspect.Parameter]:
    """The LoadOptions of every command that loads a model, declared once (cli.common)."""
    model = (
        Annotated[str, typer.Option("--model", help="Base model: smollm2-135m, a folder, a file or a hub id.")]
        if model_as_option
        else OptionalModelArg
    )
    declared = {
        "model": (model, "smollm2-135m"),
        "base_model": (BaseModelOpt, None),
        "trust_pickle": (TrustPickleOpt, False),
        "device": (DeviceOpt, "auto"),
        "dtype": (DtypeOpt, "auto"),
    }
    kind = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(name, kind, default=default, annotation=annotation)
        for name, (annotation, default) in declared.items()
    ]
