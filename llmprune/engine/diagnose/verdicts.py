"""Perplexity verdicts: healthy / acceptable / too high / broken, on a relative or an absolute scale.

`ppl_verdict(ppl, base_ppl=None)` is what doctor and the recipe's quality gate
use; its name and labels are stable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from llmprune.engine.core.findings import Advice

VERDICT_LABELS = ("healthy", "acceptable", "too high", "broken")
# Llama-3-8B-class models at 2048 tokens (the field guide): upper bounds of each label.
ABSOLUTE_SCALE = (15.0, 25.0, 50.0)
# pruned / base. A healthy Llama-3-8B sits near PPL 12 on that scale, so 15, 25 and 50
# become 15/12 = 1.25, 25/12 ≈ 2.1 and 50/12 ≈ 4.2; rounded to 1.25, 2 and 4.
RELATIVE_SCALE = (1.25, 2.0, 4.0)

_VERDICT_ADVICE = {
    "healthy": [],
    "acceptable": [Advice.FINETUNE, Advice.BF16],
    "too high": [Advice.LOWER_RATIO, Advice.KEEP_MLP, Advice.PROTECT_ENDS, Advice.FINETUNE],
    "broken": [Advice.REPRUNE_LOWER, Advice.PROTECT_ENDS, Advice.KEEP_MLP],
}
_VERDICT_MEANING = {
    "healthy": "healthy",
    "acceptable": "acceptable, but fine-tune carefully",
    "too high": "too high: prune less",
    "broken": "broken: re-prune",
}


@dataclass
class Verdict:
    """A perplexity judged on the relative (pruned/base) or the absolute scale."""

    label: str  # one of VERDICT_LABELS
    scale: str  # "relative" | "absolute"
    ppl: float
    base_ppl: float | None
    ratio: float | None  # ppl / base_ppl on the relative scale
    explanation: str
    advice: list[str] = field(default_factory=list)

    @property
    def unsafe(self) -> bool:
        return self.label == "broken"

    def to_dict(self) -> dict:
        return asdict(self)


def _label(value: float, bounds: tuple[float, float, float]) -> str:
    if not math.isfinite(value):
        return "broken"
    for bound, label in zip(bounds, VERDICT_LABELS, strict=False):
        if value < bound:
            return label
    return "broken"


def ppl_verdict(ppl: float, base_ppl: float | None = None, *, seq_len: int | None = None) -> Verdict:
    """Judge `ppl`: relative to `base_ppl` when known, else on the Llama-3-8B-at-2048 absolute scale.

    relative (pruned/base): < 1.25 healthy, 1.25-2 acceptable, 2-4 too high, ≥ 4 broken.
    absolute: < 15 healthy, 15-25 acceptable, 25-50 too high, ≥ 50 broken.
    `seq_len`, if given, only adds a caveat when the absolute scale is used on shorter windows.
    """
    if base_ppl is not None and math.isfinite(base_ppl) and base_ppl > 0:
        ratio = ppl / base_ppl if math.isfinite(ppl) else math.inf
        label = _label(ratio, RELATIVE_SCALE)
        explanation = (
            f"PPL {ppl:.2f} is {ratio:.2f}x the base model's {base_ppl:.2f}: {_VERDICT_MEANING[label]} (relative scale:"
            f" < {RELATIVE_SCALE[0]}x healthy, < {RELATIVE_SCALE[1]:g}x acceptable, < {RELATIVE_SCALE[2]:g}x too high,"
            " else broken)"
        )
        return Verdict(label, "relative", ppl, base_ppl, ratio, explanation, list(_VERDICT_ADVICE[label]))
    label = _label(ppl, ABSOLUTE_SCALE)
    explanation = (
        f"PPL {ppl:.2f}: {_VERDICT_MEANING[label]} (absolute scale for Llama-3-8B-class models at 2048 tokens: < 15"
        " healthy, 15-25 acceptable, 25-50 too high, ≥ 50 broken; base PPL unknown: llmprune doctor --base-ppl gives a"
        " relative verdict)"
    )
    if seq_len is not None and seq_len < 2048:
        explanation += (
            f"; measured on {seq_len}-token windows, which give a higher PPL than 2048, and small models sit higher on"
            " this scale"
        )
    return Verdict(label, "absolute", ppl, None, None, explanation, list(_VERDICT_ADVICE[label]))


@dataclass
class PplCheck:
    """A perplexity, where it came from, and its verdict."""

    ppl: float
    dataset: str
    seq_len: int | None
    windows: int | None
    source: str  # "measured" | "recorded by prune"
    verdict: Verdict

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict.to_dict()}
