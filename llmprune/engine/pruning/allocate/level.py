"""What one layer keeps: the one record every allocator gives and the pruning pass reads.

The global ranking (`ranking.rank_units`), the plan path (`prune_model`, from a
plan's `LayerUnits`) and the search (`search`, on the ladder of `levels`) all
say what each layer keeps as a `Level`; `cut.layer_pass.prune_layers` cuts to
it and `cut.level_database` installs it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Level", "REMOVED"]


@dataclass(frozen=True)
class Level:
    """`groups` whole KV groups (q:kv unchanged) and `channels` MLP channels, or nothing (`removed`).

    `heads_per_group` keeps that many query heads in every KV group instead (plan path,
    `--attn-unit query`); None cuts whole groups only.
    """

    groups: int
    channels: int
    removed: bool = False
    heads_per_group: int | None = None

    def to_dict(self) -> dict:
        if self.removed:
            return {"removed": True}
        by_query = {} if self.heads_per_group is None else {"heads_per_group": self.heads_per_group}
        return {"groups": self.groups, "channels": self.channels, **by_query}

    @staticmethod
    def from_dict(data: dict) -> Level:
        if data.get("removed"):
            return REMOVED
        heads = data.get("heads_per_group")
        return Level(int(data["groups"]), int(data["channels"]), heads_per_group=None if heads is None else int(heads))


REMOVED = Level(0, 0, True)
