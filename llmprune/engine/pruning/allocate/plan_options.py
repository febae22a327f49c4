"""How layer importance becomes per-layer rates: the plan options and their one set of defaults.

Torch-free on purpose: the command line shows these defaults in its help (and
the recipes start from them) without importing the engine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from llmprune.engine.core.errors import UserInputError

STRATEGIES = ("inverse", "proportional", "uniform")
ATTENTION_UNITS = ("group", "query")
DEFAULT_RATIO = 0.2


@dataclass
class PlanOptions:
    """How layer importance becomes per-layer rates."""

    ratio: float = DEFAULT_RATIO
    """Mean fraction of the prunable units removed in the prunable layers, in [0, 1)."""
    strategy: str = "inverse"
    """inverse | proportional | uniform."""
    alpha: float = 4.0
    """Contrast between layers: the least important layer's weight is e^alpha times the most important's (0 = uniform).
    """
    min_rate: float = 0.0
    """No prunable layer is pruned less than this."""
    max_rate: float = 0.8
    """No layer is pruned more than this."""
    layer_start: int = 1
    """First prunable layer (layers before it are protected)."""
    layer_end: int | None = None
    """One past the last prunable layer (None: num_layers - 1, protecting the last layer)."""

    def with_overrides(self, **values) -> PlanOptions:
        """A copy with the given fields replaced; None means "keep this one" (unset CLI options)."""
        known = {k: v for k, v in values.items() if v is not None and k in self.__dataclass_fields__}
        return replace(self, **known)

    def resolved_end(self, num_layers: int) -> int:
        return num_layers - 1 if self.layer_end is None else self.layer_end

    def prunable(self, num_layers: int) -> list[int]:
        return list(range(self.layer_start, self.resolved_end(num_layers)))

    def validate(self, num_layers: int, check_ratio: bool = True) -> None:
        """Every option; `check_ratio=False` when the ratio is still to be solved from a parameter target."""
        if check_ratio and (not (0.0 <= self.ratio < 1.0) or math.isnan(self.ratio)):
            raise UserInputError(
                f"--ratio must lie in [0, 1), got {self.ratio}", "e.g. --ratio 0.2 removes 20 % of the prunable units"
            )
        if self.strategy not in STRATEGIES:
            raise UserInputError(f"unknown --pruning-strategy '{self.strategy}'", f"use one of {', '.join(STRATEGIES)}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise UserInputError(
                f"--alpha must be ≥ 0, got {self.alpha}", "0 gives a uniform plan, larger values a sharper one"
            )
        if not (0.0 <= self.min_rate <= self.max_rate < 1.0):
            raise UserInputError(
                f"need 0 ≤ --min-pruning-rate ≤ --max-pruning-rate < 1, got {self.min_rate} and {self.max_rate}",
                "e.g. --min-pruning-rate 0 --max-pruning-rate 0.8",
            )
        end = self.resolved_end(num_layers)
        if not (0 <= self.layer_start < end <= num_layers):
            raise UserInputError(
                f"layer range [{self.layer_start}, {end}) is empty or outside the model's {num_layers} layers",
                f"need 0 ≤ --layer-start < --layer-end ≤ {num_layers}",
            )
        if check_ratio and self.ratio > 0 and not (self.min_rate <= self.ratio <= self.max_rate):
            raise UserInputError(
                f"--ratio {self.ratio} cannot be met with every prunable layer between {self.min_rate} and"
                f" {self.max_rate}",
                "widen --min-pruning-rate/--max-pruning-rate or the layer range, or change --ratio",
            )

    def to_dict(self) -> dict:
        return asdict(self)


def plan_default(name: str):
    """The default of one plan option (what `--help` shows; the one place it is set)."""
    return PlanOptions.__dataclass_fields__[name].default
