"""How much a prune removes: --ratio, --target-params and --drop-layers, read once into a `Budget`.

`resolve_budget` is the one place these options are parsed and checked (before any path is chosen or any
weight is read); every path takes the `Budget` and asks it, with the model's `cost.ParameterCost`, how many
parameters to remove. Torch-free, so that the command line can check the options before loading anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.pruning.allocate.plan_options import DEFAULT_RATIO

if TYPE_CHECKING:
    from llmprune.engine.pruning.allocate.cost import ParameterCost

__all__ = ["Budget", "resolve_budget", "parse_target_params"]

_MULTIPLIERS = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


@dataclass(frozen=True)
class Budget:
    """What to remove: a share of the prunable parameters, or a size to land on; and whole layers first."""

    ratio: float | None = None
    """Share of the prunable parameters (KV groups, MLP channels) to remove; None when a target is given."""
    target_params: int | None = None
    """The size to land on, in parameters (--target-params 6.5B)."""
    keep_fraction: float | None = None
    """The size to land on as a share of the model (--target-params 0.8), resolved against its total."""
    drop_layers: int = 0
    """Whole decoder layers removed first (depth pruning)."""

    @property
    def by_target(self) -> bool:
        return self.target_params is not None or self.keep_fraction is not None

    @property
    def resolved_ratio(self) -> float:
        """The ratio asked for (the default when neither option was given); meaningless with a target."""
        return DEFAULT_RATIO if self.ratio is None else self.ratio

    def target(self, total: int) -> int | None:
        """The parameter count to land on for a model of `total` parameters (None: a ratio budget)."""
        if self.keep_fraction is not None:
            return int(round(self.keep_fraction * total))
        if self.target_params is not None and self.target_params > total:
            raise UserInputError(
                f"--target-params {self.target_params:,} must be at most the model's {total:,} parameters",
                "use e.g. 0.8 to keep 80 % of the parameters",
            )
        return self.target_params

    def params_to_remove(self, cost: ParameterCost) -> int:
        """Parameters to remove from the model `cost` describes (the global and streamed paths)."""
        target = self.target(cost.total)
        if target is not None:
            return cost.total - target
        return int(self.resolved_ratio * cost.prunable())

    def to_dict(self) -> dict:
        return asdict(self)


def parse_target_params(text: str) -> tuple[int | None, float | None]:
    """'6.5B', '900M', '120000' (absolute) -> (count, None); a fraction ≤ 1 ('0.8') -> (None, 0.8)."""
    cleaned = str(text).strip().upper().replace("_", "").replace(",", "")
    try:
        if cleaned and cleaned[-1] in _MULTIPLIERS:
            value, fraction = float(cleaned[:-1]) * _MULTIPLIERS[cleaned[-1]], False
        else:
            value = float(cleaned)
            fraction = 0 < value <= 1
    except ValueError:
        raise UserInputError(
            f"--target-params '{text}' is not a number", "use e.g. 6.5B, 110M or 0.8 (a fraction of the model)"
        ) from None
    if math.isnan(value) or math.isinf(value) or value <= 0 or (not fraction and round(value) < 1):
        raise UserInputError(
            f"--target-params {text} must be a positive size", "use e.g. 6.5B, 110M or 0.8 (keep 80 % of the model)"
        )
    return (None, value) if fraction else (int(round(value)), None)


def resolve_budget(ratio: float | None, target_params: str | None, drop_layers: int = 0) -> Budget:
    """--ratio / --target-params / --drop-layers -> one Budget; bad values are one line each (exit 2)."""
    if ratio is not None and target_params is not None:
        raise UserInputError("--ratio and --target-params were both given", "give one of them")
    if ratio is not None and (math.isnan(ratio) or not (0 <= ratio < 1)):
        raise UserInputError(
            f"--ratio must lie in [0, 1), got {ratio}", "e.g. --ratio 0.2 removes 20 % of the prunable units"
        )
    if drop_layers < 0:
        raise UserInputError(f"--drop-layers must be ≥ 0, got {drop_layers}", "e.g. --drop-layers 4")
    if target_params is None:
        return Budget(ratio=ratio, drop_layers=drop_layers)
    count, fraction = parse_target_params(target_params)
    return Budget(target_params=count, keep_fraction=fraction, drop_layers=drop_layers)
