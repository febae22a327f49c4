"""Which way `llmprune prune` goes, decided once, with the reason said out loud.

Three paths share one pruning core (`layer_pass.prune_layers`):
- global: every KV group and MLP channel of every layer is measured and the
  cheapest are cut across all layers (`global_path.prune_globally`);
- plan: layer importance -> per-layer rates -> units (`cut.prune_model`), the field
  guide's way; any of its options selects it;
- streamed: the global path with the weights on disk, one layer in memory.

`choose_path` is the only place that decides; an option the chosen path does
not use is an error with a hint, never a silent switch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from llmprune.engine.core.errors import UserInputError

if TYPE_CHECKING:
    import torch

    from llmprune.engine.pruning.config import PruneConfig

PATHS = ("global", "plan", "streamed", "search")
ALLOCATIONS = ("global", "plan", "search")
# the field guide's options: giving any of them asks for a layer-importance plan (config field -> option)
FIELD_GUIDE_OPTIONS = {
    "importance_method": "--importance-method",
    "strategy": "--pruning-strategy",
    "alpha": "--alpha",
    "min_rate": "--min-pruning-rate",
    "max_rate": "--max-pruning-rate",
    "layer_start": "--layer-start",
    "layer_end": "--layer-end",
}


@dataclass(frozen=True)
class PrunePath:
    """The path a prune takes and why (printed, and recorded in report.json and llmprune.json)."""

    name: str  # global | plan | streamed
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def plan_options_given(config: PruneConfig) -> list[str]:
    """The options given that only a layer-importance plan uses (CLI spelling)."""
    given = [flag for field, flag in FIELD_GUIDE_OPTIONS.items() if getattr(config, field) is not None]
    if config.importance_config is not None:
        given.append("--importance-config")
    if config.uniform:
        given.append("--uniform")
    if config.attn_unit == "query":
        given.append("--attn-unit query")
    if config.compensation is not None:
        given.append("a Python compensation step")
    return given


def _unused(option: str, path: str, hint: str) -> UserInputError:
    return UserInputError(f"{option} is not used by the {path} path", hint)


def _allocation(config: PruneConfig) -> PrunePath:
    """global or plan, from the options alone."""
    plan_options = plan_options_given(config)
    if config.allocation == "search":
        if plan_options:
            raise UserInputError(
                f"{plan_options[0]} belongs to the layer-importance plan, but --allocation search was given",
                f"leave out {plan_options[0]}, or --allocation search",
            )
        return PrunePath(
            "search", "--allocation search: per-layer levels searched against KL to the dense model on held-out text"
        )
    if config.allocation == "plan":
        return PrunePath("plan", "--allocation plan")
    if plan_options and config.allocation == "global":
        raise UserInputError(
            f"{plan_options[0]} belongs to the layer-importance plan, but --allocation global was given",
            f"leave out --allocation global to prune along the plan, or leave out {plan_options[0]}",
        )
    if plan_options:
        return PrunePath("plan", f"{', '.join(plan_options)} selects the layer-importance plan")
    return PrunePath("global", "the default: units ranked across all layers")


def _check_unused(config: PruneConfig, path: PrunePath) -> None:
    if path.name != "search":
        for option, value in (("--search-budget", config.search_budget), ("--search-dataset", config.search_dataset)):
            if value is not None:
                raise _unused(option, path.name, f"add --allocation search (or leave out {option})")
    if path.name == "search":
        if config.stream:
            raise UserInputError(
                "--allocation search does not stream yet: its level database needs the model in memory",
                "leave out --stream (or use the default allocation to prune streamed)",
            )
        if config.drop_layers:
            raise _unused("--drop-layers", "search", "the search removes whole layers itself where that costs least")
    if path.name == "plan":
        if config.drop_layers:
            raise _unused(
                "--drop-layers",
                "plan",
                "depth pruning belongs to the global path: leave out the plan options "
                f"({', '.join(plan_options_given(config)) or '--allocation plan'})",
            )
        if config.stream:
            raise _unused("--stream", "plan", "streaming prunes along the global path: leave out the plan options")
        return
    if config.round_to != 1:
        raise _unused(
            "--round-to",
            path.name,
            "MLP widths are rounded by the plan path: add --allocation plan (or leave out --round-to)",
        )
    if path.name == "streamed" and (config.drop_layers or config.test_after_prune):
        raise UserInputError(
            "--stream cannot be combined with --drop-layers or --test-after-prune (the model is never in memory)",
            "evaluate the saved model with `llmprune eval DIR`",
        )


def choose_path(config: PruneConfig, device: torch.device | None = None) -> PrunePath:
    """global / plan / streamed for this config, with the reason; raises on options the path would ignore.

    `device` is where the model would be loaded: without it (or when the
    model is already in memory) the streamed path is never chosen automatically.
    """
    path = _allocation(config)
    if path.name == "global" and config.stream is not False:
        path = _maybe_streamed(config, path, device)
    _check_unused(config, path)
    return path


def _maybe_streamed(config: PruneConfig, path: PrunePath, device) -> PrunePath:
    from llmprune.engine.walk.streaming import model_bytes, should_stream, stream_source

    if config.stream and (config.drop_layers or config.test_after_prune):
        return PrunePath("streamed", "--stream")  # _check_unused says what does not combine
    if config.drop_layers or config.test_after_prune:
        return path  # both need the whole model in memory
    if config.stream:
        if stream_source(config.model) is None:
            raise UserInputError(
                f"--stream needs a model directory with safetensors weights (or a .gguf / alias), not {config.model}",
                "save the model with save_pretrained(..., safe_serialization=True) first",
            )
        return PrunePath("streamed", "--stream")
    if device is None:
        return path
    source = stream_source(config.model)
    if source is None:
        return path
    size = model_bytes(source) / 2**30
    if should_stream(source, device):
        return PrunePath(
            "streamed", f"the weights ({size:.2f} GiB, with 1.5× headroom) do not fit the free memory of {device}"
        )
    return PrunePath(
        "global", f"the default: units ranked across all layers; the weights ({size:.2f} GiB) fit {device}"
    )
