"""One diagnosed problem: what, where, how bad, and what to do about it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SEVERITIES = ("error", "warning", "info")  # error: unsafe to train on


@dataclass
class Finding:
    """A problem found in a checkpoint.

    severity: "error" (unsafe to train) | "warning" | "info".
    check: "nan" | "inf" | "huge" | "zeros" | "gqa" | "shape" | "fit" | "forward" | "ppl".
    location: the exact tensor or layer, e.g. "model.layers.3.mlp.down_proj.weight".
    advice: what to do, most likely fix first.
    """

    severity: str
    check: str
    location: str
    message: str
    advice: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Advice:
    """The fixes doctor recommends, worded once so that every finding says the same thing."""

    RESTORE = (
        "do not train on this checkpoint: go back to the last checkpoint without the fault, or re-prune from the base"
        " model"
    )
    REPRUNE = "re-prune from the base model"
    REPRUNE_LOWER = "re-prune from the base model with a lower ratio (llmprune prune --ratio)"
    LOWER_RATIO = "lower the pruning ratio (llmprune prune --ratio, e.g. by a third)"
    KEEP_MLP = "prune attention groups only, not MLP channels (llmprune prune without --prune-mlp)"
    PROTECT_ENDS = (
        "protect more of the first and last layers, the most sensitive ones (e.g. llmprune prune --layer-start 2"
        " --layer-end N-2)"
    )
    LOWER_LR = "lower the learning rate (e.g. ÷10) and clip gradients (max-norm 1.0)"
    BF16 = (
        "train in bf16 (or fp32), not fp16: fp16 overflows once pruning removes the weights that balanced large"
        " activations"
    )
    FINETUNE = "recover with llmprune finetune (low learning rate, bf16), then check again"
    REMOVE_MASKED = (
        "the zeros look like masked pruning that was never removed: prune structurally (llmprune prune) so the model"
        " really shrinks"
    )
    WHOLE_GROUPS = "re-prune removing whole KV groups (llmprune prune keeps heads:kv_heads as in the base model)"
    EVEN_HEADS = "if you prune query heads, remove the same number from every KV group of a layer"
    CHECK_CONFIG = (
        "check config.json (or the --base-model of a weights-only file): it must describe the model these weights come"
        " from"
    )
    RESAVE = "re-save the model with llmprune (it records per-layer shapes so that it reloads)"

    @staticmethod
    def look_at(location: str) -> str:
        return f"look at {location}: it is the first module whose output is not finite"
