"""The searched allocation: an evolutionary search over per-layer levels, judged by KL to the dense model.

EvoPress (Sieberling et al., ICML 2025) and Týr-the-Pruner (NeurIPS 2025): start
from an allocation that meets the budget (the uniform one, or others given),
make offspring by moving one to three level steps between layers (exchanged
within one kind, MLP with MLP, attention with attention, so the budget holds;
a removed layer is balanced with MLP steps), and select in stages on fresh
random samples of held-out calibration windows of growing size: many
offspring on a few windows, the survivors on more, the parent joining the
last stage so it is replaced only by a child that beats it on the same text.
The last parent is then judged on every held-out window, as the starts
were, and the start is returned instead when the search did not beat it
there: a few windows flatter whichever candidate won on them.

Fitness: the mean per-token KL divergence of the candidate's next-token
distribution to the dense model's, on the dense model's top-k tokens plus
one bin for the rest (a lower bound of the full KL that needs only k logits
per token cached). A paired measure on the same windows: no noise from the
choice of text between the two models.

The state (parent, generation, fitness curve, what was spent) is written
atomically after every generation; a rerun with the same inputs resumes
from it, and Ctrl-C leaves it there.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from llmprune.engine.core.paths import atomic_write_json
from llmprune.engine.pruning.allocate.level import REMOVED, Level
from llmprune.engine.pruning.allocate.levels import Ladder

__all__ = ["SearchOptions", "SearchOutcome", "KLFitness", "evolve", "mutate"]

STATE_VERSION = 1


@dataclass
class SearchOptions:
    """How long and how the allocation is searched."""

    offspring: int = 8
    """Children of the parent per generation."""
    stages: tuple[tuple[int, int], ...] = ((4, 3), (16, 1))
    """(windows, survivors) per selection stage; the parent joins the last stage. Fewer windows let chance
    choose: with a last stage of 8 windows, 92 generations in 106 replaced their parent (docs/commands/prune.md)."""
    max_moves: int = 3
    """Level steps per child: 1..max_moves."""
    budget_tokens: int | None = None
    """Stop after forwarding this many tokens (None: no token bound)."""
    budget_seconds: float | None = None
    """Stop after this much wall time (None: no time bound)."""
    generations: int | None = None
    """Stop after this many generations (None: until a budget is spent)."""
    depth_share: float = 0.15
    """Share of moves that remove or restore a whole layer (when the ladder allows depth)."""
    attention_share: float = 0.25
    """Share of moves that exchange a KV group."""
    seed: int = 0

    def fewest_windows(self) -> int:
        """Held-out windows the stages need."""
        return max(n for n, _ in self.stages)

    def bounded(self) -> bool:
        return any(v is not None for v in (self.budget_tokens, self.budget_seconds, self.generations))


@dataclass
class SearchOutcome:
    """What the search found and what it cost."""

    allocation: list[Level]
    fitness: float  # KL of the allocation returned, on every held-out window
    kept_start: bool  # the search's last parent was no better than its start on every held-out window
    start: str  # which start allocation the search began from
    start_fitness: dict[str, float]
    generations: int
    tokens: int
    seconds: float
    curve: list[dict] = field(default_factory=list)  # per generation: last-stage fitness, tokens, seconds, accepted
    resumed_from: int | None = None  # generation a saved state was resumed at
    stopped_by: str = "budget"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["allocation"] = [lv.to_dict() for lv in self.allocation]
        return data


# ---------------------------------------------------------------- fitness


class Levels(Protocol):
    """What the fitness needs of the level database (`cut.level_database.LevelDatabase`)."""

    layers: list[nn.Module]

    def install(self, layer: int, level: Level) -> None: ...


class KLFitness:
    """KL of a candidate to the dense model on held-out windows; dense top-k log-probabilities cached once."""

    def __init__(self, model: nn.Module, runner, database: Levels, ids: torch.Tensor, top_k: int = 64):
        self.model, self.runner, self.database, self.ids, self.top_k = model, runner, database, ids, top_k
        self.tokens = 0
        self.batch_size = runner.batch_size
        self._dense_values, self._dense_indices = self._dense_reference()

    @torch.no_grad()
    def _logits(self, windows: torch.Tensor, removed: set[int]) -> torch.Tensor:
        base = self.model.model
        hidden = base.embed_tokens(windows)
        for index, layer in enumerate(self.database.layers):
            if index not in removed:
                hidden = self.runner.layer(layer, hidden)
        return self.model.lm_head(base.norm(hidden)).float()

    @torch.no_grad()
    def _dense_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = [], []
        for batch in self.ids.split(self.batch_size):
            logp = torch.log_softmax(self._logits(batch, set()), -1)
            top = logp.topk(self.top_k, -1)
            values.append(top.values)
            indices.append(top.indices)
        return torch.cat(values), torch.cat(indices)

    @torch.no_grad()
    def __call__(self, allocation: Sequence[Level], windows: Sequence[int]) -> float:
        """Mean per-token KL(dense ‖ candidate) on these selection windows."""
        for index, level in enumerate(allocation):
            self.database.install(index, level)
        removed = {i for i, lv in enumerate(allocation) if lv.removed}
        total, count = 0.0, 0
        index = torch.as_tensor(list(windows), dtype=torch.long)
        for chunk in index.split(self.batch_size):
            logq = torch.log_softmax(self._logits(self.ids[chunk], removed), -1)
            logp, top = self._dense_values[chunk], self._dense_indices[chunk]
            q_top = logq.gather(-1, top)
            p = logp.exp()
            p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
            q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
            kl = (p * (logp - q_top)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
            total += float(kl.sum())
            count += kl.numel()
            self.tokens += kl.numel()
        return total / max(count, 1)


# ---------------------------------------------------------------- offspring


def _kept(allocation: Sequence[Level], ladder: Ladder) -> list[int]:
    return [i for i, lv in enumerate(allocation) if not lv.removed]


def _channel_move(allocation: list[Level], ladder: Ladder, layer: int, direction: int) -> bool:
    """One MLP step down (+1) or up (-1) in `layer`; False when the ladder ends there."""
    level = allocation[layer]
    if level.removed:
        return False
    levels = ladder.channel_levels(layer)
    k = levels.index(level.channels) + direction
    if not 0 <= k < len(levels):
        return False
    allocation[layer] = Level(level.groups, levels[k])
    return True


def _group_move(allocation: list[Level], ladder: Ladder, layer: int, direction: int) -> bool:
    level = allocation[layer]
    if level.removed:
        return False
    groups = level.groups - direction
    if groups not in ladder.group_levels(layer):
        return False
    allocation[layer] = Level(groups, level.channels)
    return True


def _exchange(allocation: list[Level], ladder: Ladder, rng: random.Random, move) -> bool:
    """One step down in one layer and one step up in another (same kind): the budget holds exactly."""
    kept = _kept(allocation, ladder)
    for _ in range(8):
        down, up = rng.sample(kept, 2) if len(kept) >= 2 else (None, None)
        if down is None:
            return False
        trial = list(allocation)
        if move(trial, ladder, down, +1) and move(trial, ladder, up, -1):
            allocation[:] = trial
            return True
    return False


def rebalance(allocation: list[Level], ladder: Ladder, budget: int, rng: random.Random) -> bool:
    """MLP (then attention) steps in random kept layers until the allocation fits the budget again."""
    kept = _kept(allocation, ladder)
    for _ in range(10_000):
        params = ladder.params(allocation)
        if ladder.fits(allocation, budget):
            return True
        direction = +1 if params > budget else -1
        candidates = [i for i in kept if _channel_move(list(allocation), ladder, i, direction)]
        if direction < 0:  # growing: only steps that stay within the budget
            candidates = [i for i in candidates if _grown_fits(allocation, ladder, i, budget)]
        if not candidates:
            return False
        _channel_move(allocation, ladder, rng.choice(candidates), direction)
    return False


def _grown_fits(allocation: list[Level], ladder: Ladder, layer: int, budget: int) -> bool:
    trial = list(allocation)
    _channel_move(trial, ladder, layer, -1)
    return ladder.params(trial) <= budget


def _depth_move(allocation: list[Level], ladder: Ladder, budget: int, rng: random.Random) -> bool:
    """Remove a kept layer or restore a removed one, then rebalance with MLP steps."""
    removed = [i for i, lv in enumerate(allocation) if lv.removed]
    removable = [i for i in _kept(allocation, ladder) if i not in ladder.protected]
    trial = list(allocation)
    if removed and (not removable or rng.random() < 0.5):
        layer = rng.choice(removed)
        kept = [lv for lv in allocation if not lv.removed]
        typical = sorted(kept, key=lambda lv: (lv.groups, lv.channels))[len(kept) // 2] if kept else ladder.full(layer)
        trial[layer] = typical
    elif removable:
        trial[rng.choice(removable)] = REMOVED
    else:
        return False
    if not rebalance(trial, ladder, budget, rng):
        return False
    allocation[:] = trial
    return True


def mutate(
    parent: Sequence[Level], ladder: Ladder, budget: int, rng: random.Random, options: SearchOptions
) -> list[Level] | None:
    """A child 1..max_moves level steps away from `parent` that fits the budget (None if none was found)."""
    child = list(parent)
    moves = rng.randint(1, options.max_moves)
    done = 0
    for _ in range(moves * 4):
        if done == moves:
            break
        roll = rng.random()
        if ladder.depth and roll < options.depth_share:
            ok = _depth_move(child, ladder, budget, rng)
        elif ladder.attention and roll < options.depth_share + options.attention_share:
            ok = _exchange(child, ladder, rng, _group_move)
        else:
            ok = _exchange(child, ladder, rng, _channel_move)
        done += ok
    if done == 0 or child == list(parent) or not ladder.fits(child, budget):
        return None
    return child


# ---------------------------------------------------------------- the search


Progress = Callable[[int, float, float | None], None]
"""(generation, best fitness, seconds left or None)."""


def _signature(ladder: Ladder, budget: int, fitness_windows: int, options: SearchOptions, extra: dict) -> dict:
    return {
        "version": STATE_VERSION,
        "layers": ladder.num_layers,
        "step": ladder.step,
        "budget": budget,
        "windows": fitness_windows,
        "stages": [list(s) for s in options.stages],
        "seed": options.seed,
        **extra,
    }


def _load_state(path: Path | None, signature: dict) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("signature") == signature else None


class _Clock:
    def __init__(self, options: SearchOptions, tokens: int, seconds: float):
        self.options, self.start_tokens, self.start_seconds = options, tokens, seconds
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.start_seconds + time.perf_counter() - self.started

    def spent(self, tokens: int, generation: int) -> str | None:
        o = self.options
        if o.generations is not None and generation >= o.generations:
            return "generations"
        if o.budget_tokens is not None and tokens >= o.budget_tokens:
            return "tokens"
        if o.budget_seconds is not None and self.seconds() >= o.budget_seconds:
            return "time"
        return None

    def left(self, tokens: int, generation: int) -> float | None:
        """Seconds left, from the pace so far (None before the first generation)."""
        o, elapsed = self.options, self.seconds()
        if elapsed <= 0 or generation == 0:
            return None
        fractions = []
        if o.generations is not None:
            fractions.append(generation / o.generations)
        if o.budget_tokens is not None:
            fractions.append(tokens / o.budget_tokens)
        if o.budget_seconds is not None:
            fractions.append(elapsed / o.budget_seconds)
        done = max(fractions, default=0.0)
        return elapsed * (1 - done) / done if done > 0 else None


def evolve(
    ladder: Ladder,
    budget: int,
    fitness: Callable[[Sequence[Level], Sequence[int]], float],
    windows: int,
    starts: dict[str, list[Level]],
    options: SearchOptions,
    state_path: Path | None = None,
    progress: Progress | None = None,
    tokens_spent: Callable[[], int] | None = None,
    signature_extra: dict | None = None,
) -> SearchOutcome:
    """Search from the best of `starts`; fitness(allocation, window indices) -> KL (lower is better)."""
    if not options.bounded():
        raise ValueError("the search needs a bound: generations, tokens or seconds")
    if windows < options.fewest_windows():
        raise ValueError(f"the search needs at least {options.fewest_windows()} held-out windows, got {windows}")
    counted = tokens_spent or (lambda: 0)
    signature = _signature(ladder, budget, windows, options, signature_extra or {})
    state = _load_state(state_path, signature)
    if state is not None:
        parent = [Level.from_dict(d) for d in state["parent"]]
        parent_fitness, generation = state["fitness"], state["generation"]
        start, start_fitness, curve = state["start"], state["start_fitness"], state["curve"]
        base_tokens, clock = state["tokens"], _Clock(options, state["tokens"], state["seconds"])
        resumed = generation
    else:
        clock = _Clock(options, 0, 0.0)
        base_tokens, generation, curve, resumed = 0, 0, [], None
        # the starts are compared on every held-out window, once: the start decides more than a few
        # generations can change, and a handful of windows can rank two starts wrongly
        start_fitness = {name: fitness(allocation, range(windows)) for name, allocation in starts.items()}
        start = min(start_fitness, key=start_fitness.get)
        parent, parent_fitness = list(starts[start]), start_fitness[start]
    offset = counted()

    def tokens() -> int:
        return base_tokens + counted() - offset

    def save() -> None:
        if state_path is None:
            return
        atomic_write_json(
            state_path,
            {
                "signature": signature,
                "generation": generation,
                "parent": [lv.to_dict() for lv in parent],
                "fitness": parent_fitness,
                "start": start,
                "start_fitness": start_fitness,
                "curve": curve,
                "tokens": tokens(),
                "seconds": clock.seconds(),
            },
        )

    save()
    stopped = clock.spent(tokens(), generation)
    while stopped is None:
        rng = random.Random(f"{options.seed}:{generation}")  # one stream per generation: a resumed run repeats it
        children, seen = [], {tuple(parent)}
        for _ in range(options.offspring * 10):
            if len(children) == options.offspring:
                break
            child = mutate(parent, ladder, budget, rng, options)
            if child is not None and tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        pool = [(c, math.inf) for c in children]
        for stage, (count, survivors) in enumerate(options.stages):
            last = stage == len(options.stages) - 1
            sample = rng.sample(range(windows), count)
            if last:
                pool = pool + [(parent, math.inf)]
            scored = sorted(((fitness(c, sample), i) for i, (c, _) in enumerate(pool)), key=lambda s: s[0])
            pool = [(pool[i][0], f) for f, i in scored[: (1 if last else survivors)]]
        best, best_fitness = pool[0]
        accepted = best is not parent
        parent, parent_fitness = list(best), best_fitness
        generation += 1
        curve.append(
            {
                "generation": generation,
                "fitness": parent_fitness,
                "accepted": accepted,
                "tokens": tokens(),
                "seconds": round(clock.seconds(), 2),
            }
        )
        save()
        if progress:
            progress(generation, parent_fitness, clock.left(tokens(), generation))
        stopped = clock.spent(tokens(), generation)
    # the last stage's few windows chose the parent and flatter it (the best of several on the same
    # windows); the allocation returned is judged on every held-out window, like the starts were
    unchanged = parent == list(starts[start])  # then its figure on every window is the start's, already known
    final_fitness = start_fitness[start] if unchanged else fitness(parent, range(windows))
    kept_start = final_fitness > start_fitness[start]
    if kept_start:
        parent, final_fitness = list(starts[start]), start_fitness[start]
    return SearchOutcome(
        allocation=parent,
        fitness=final_fitness,
        kept_start=kept_start,
        start=start,
        start_fitness=start_fitness,
        generations=generation,
        tokens=tokens(),
        seconds=round(clock.seconds(), 2),
        curve=curve,
        resumed_from=resumed,
        stopped_by=stopped,
    )
