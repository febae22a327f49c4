"""Health checks of a model and perplexity verdicts.

`preflight_check(model, tokenizer)` is what finetune and recipe call before
they start: weights scan (NaN, Inf, huge values, zeros), GQA and shape check,
and a short forward test. `ppl_verdict(ppl, base_ppl)` judges a perplexity.
`llmprune doctor` (engine.doctor) runs the same checks on files without
building the model first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from llmprune.engine.findings import SEVERITIES, Advice, Finding
from llmprune.engine.forward_probe import ForwardResult, forward_test
from llmprune.engine.structure_check import Structure, read_structure
from llmprune.engine.tensor_scan import TensorStats, huge_tensors, layer_index, tensor_stats

__all__ = [
    "Finding", "HealthReport", "LayerSummary", "Verdict", "PplCheck", "preflight_check", "ppl_verdict",
    "weight_findings", "forward_findings", "build_report", "VERDICT_LABELS",
]

# A weight with at least this share of exact zeros looks masked rather than pruned.
ZERO_SHARE_WARNING = 0.5
# Above this share of exact zeros over the whole model, the summary stops calling it normal.
ZERO_SHARE_NORMAL = 0.10


# ---------------------------------------------------------------- perplexity verdicts

VERDICT_LABELS = ("healthy", "acceptable", "too high", "broken")
# Llama-3-8B-class models at 2048 tokens (the field guide): upper bounds of each label.
ABSOLUTE_SCALE = (15.0, 25.0, 50.0)
# pruned / base. A healthy Llama-3-8B sits near PPL 12 on that scale, so 15, 25 and 50
# become 15/12 = 1.25, 25/12 ≈ 2.1 and 50/12 ≈ 4.2; rounded to 1.25, 2 and 4.
RELATIVE_SCALE = (1.25, 2.0, 4.0)

_VERDICT_ADVICE = {
    "healthy": [],
    "acceptable": [Advice.FINETUNE, Advice.LOWER_LR, Advice.BF16],
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
    for bound, label in zip(bounds, VERDICT_LABELS):
        if value < bound:
            return label
    return "broken"


def ppl_verdict(ppl: float, base_ppl: float | None = None) -> Verdict:
    """Judge `ppl`: relative to `base_ppl` when known, else on the Llama-3-8B-at-2048 absolute scale.

    relative (pruned/base): < 1.25 healthy, 1.25-2 acceptable, 2-4 too high, ≥ 4 broken.
    absolute: < 15 healthy, 15-25 acceptable, 25-50 too high, ≥ 50 broken.
    """
    if base_ppl is not None and math.isfinite(base_ppl) and base_ppl > 0:
        ratio = ppl / base_ppl if math.isfinite(ppl) else math.inf
        label = _label(ratio, RELATIVE_SCALE)
        explanation = (
            f"PPL {ppl:.2f} is {ratio:.2f}x the base model's {base_ppl:.2f}: {_VERDICT_MEANING[label]} "
            f"(relative scale: < {RELATIVE_SCALE[0]}x healthy, < {RELATIVE_SCALE[1]:g}x acceptable, < {RELATIVE_SCALE[2]:g}x too high, else broken)"
        )
        return Verdict(label, "relative", ppl, base_ppl, ratio, explanation, list(_VERDICT_ADVICE[label]))
    label = _label(ppl, ABSOLUTE_SCALE)
    explanation = (
        f"PPL {ppl:.2f}: {_VERDICT_MEANING[label]} (absolute scale for Llama-3-8B-class models at 2048 tokens: "
        f"< 15 healthy, 15-25 acceptable, 25-50 too high, ≥ 50 broken; base PPL unknown, pass --base-ppl for a relative verdict)"
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


# ---------------------------------------------------------------- the report


@dataclass
class LayerSummary:
    """One decoder layer's weights in numbers."""

    index: int
    parameters: int
    nan: int
    inf: int
    zero_share: float
    max_abs: float
    findings: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HealthReport:
    """Everything the checks found; `ok` is False when training on the model is unsafe."""

    findings: list[Finding] = field(default_factory=list)
    num_parameters: int = 0
    num_tensors: int = 0
    nan: int = 0
    inf: int = 0
    zero_share: float = 0.0
    max_abs: float = 0.0
    max_abs_tensor: str = ""
    layers: list[LayerSummary] = field(default_factory=list)
    structure: Structure | None = None
    forward: ForwardResult | None = None
    ppl: PplCheck | None = None

    @property
    def ok(self) -> bool:
        return not any(finding.severity == "error" for finding in self.findings)

    def by_severity(self, severity: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == severity]

    @property
    def advice(self) -> list[str]:
        """Every finding's advice once, errors' first, in the order the findings were made."""
        ordered: list[str] = []
        for severity in SEVERITIES:
            for finding in self.by_severity(severity):
                for line in finding.advice:
                    if line not in ordered:
                        ordered.append(line)
        return ordered

    @property
    def huge_count(self) -> int:
        return sum(1 for finding in self.findings if finding.check == "huge")

    def summary(self) -> list[tuple[bool, str]]:
        """The one-glance lines: (passed, text)."""
        lines = [
            (self.nan == 0, "no NaN" if self.nan == 0 else f"{self.nan:,} NaN values"),
            (self.inf == 0, "no Inf" if self.inf == 0 else f"{self.inf:,} Inf values"),
            (self.zero_share < ZERO_SHARE_NORMAL, f"zero share {'normal' if self.zero_share < ZERO_SHARE_NORMAL else 'high'}: {100 * self.zero_share:.1f} %"),
            (self.huge_count == 0, "no abnormally large values" if self.huge_count == 0 else f"{self.huge_count} tensor(s) with abnormally large values"),
        ]
        if self.structure is not None:
            gqa_errors = [f for f in self.findings if f.check == "gqa"]
            ratios = ", ".join(f"{r:g}" for r in self.structure.gqa_ratios) or "?"
            shape_errors = [f for f in self.findings if f.check in ("shape", "fit") and f.severity == "error"]
            lines.append((not gqa_errors, f"GQA valid (heads:kv_heads {ratios}:1)" if not gqa_errors else f"GQA broken in {len(gqa_errors)} layer(s)"))
            lines.append((not shape_errors, "shapes consistent" if not shape_errors else f"{len(shape_errors)} shape problem(s)"))
        if self.forward is not None:
            lines.append((self.forward.ok, "forward pass finite" if self.forward.ok else "forward pass not finite" if self.forward.error is None else "forward pass failed"))
        if self.ppl is not None:
            lines.append((self.ppl.verdict.label in ("healthy", "acceptable"), f"PPL {self.ppl.ppl:.2f}: {self.ppl.verdict.label} ({self.ppl.verdict.scale} scale)"))
        return lines

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "summary": [{"passed": passed, "text": text} for passed, text in self.summary()],
            "findings": [finding.to_dict() for finding in self.findings],
            "advice": self.advice,
            "num_parameters": self.num_parameters,
            "num_tensors": self.num_tensors,
            "nan": self.nan,
            "inf": self.inf,
            "zero_share": self.zero_share,
            "max_abs": self.max_abs,
            "max_abs_tensor": self.max_abs_tensor,
            "layers": [layer.to_dict() for layer in self.layers],
            "structure": self.structure.to_dict() if self.structure else None,
            "forward": self.forward.to_dict() if self.forward else None,
            "ppl": self.ppl.to_dict() if self.ppl else None,
        }


# ---------------------------------------------------------------- findings from numbers


def weight_findings(all_stats: list[TensorStats]) -> list[Finding]:
    """NaN, Inf, huge and mostly-zero tensors, each named exactly."""
    findings = []
    for stats in all_stats:
        where = f" (layer {stats.layer})" if stats.layer is not None else ""
        if stats.nan:
            findings.append(Finding("error", "nan", stats.name, f"{stats.nan:,} NaN of {stats.numel:,} values{where}", [Advice.RESTORE, Advice.LOWER_LR, Advice.BF16]))
        if stats.inf:
            findings.append(Finding("error", "inf", stats.name, f"{stats.inf:,} Inf of {stats.numel:,} values{where}", [Advice.BF16, Advice.RESTORE, Advice.LOWER_LR]))
        if len(stats.shape) >= 2 and stats.zero_share >= ZERO_SHARE_WARNING:
            findings.append(Finding("warning", "zeros", stats.name, f"{100 * stats.zero_share:.1f} % of the values are exactly zero{where}", [Advice.REMOVE_MASKED, Advice.REPRUNE]))
    for flagged in huge_tensors(all_stats):
        where = f" (layer {flagged.stats.layer})" if flagged.stats.layer is not None else ""
        findings.append(Finding("error", "huge", flagged.stats.name, f"abnormally large values{where}: {flagged.rule}", [Advice.LOWER_LR, Advice.BF16, Advice.RESTORE]))
    return findings


def forward_findings(result: ForwardResult, weights_have_faults: bool) -> list[Finding]:
    if result.ok:
        return []
    if result.error is not None:
        return [Finding("error", "forward", result.first_nonfinite_module or "model", f"the forward pass failed: {result.error}", [Advice.CHECK_CONFIG, Advice.RESAVE])]
    location = result.first_nonfinite_module or "logits"
    advice = [Advice.look_at(location)]
    advice += [Advice.RESTORE] if weights_have_faults else [Advice.BF16, Advice.PROTECT_ENDS, Advice.REPRUNE_LOWER]
    return [Finding("error", "forward", location, f"the output goes non-finite first at {location} ({result.nan:,} NaN, {result.inf:,} Inf in the logits)", advice)]


def _layer_summaries(all_stats: list[TensorStats], findings: list[Finding]) -> list[LayerSummary]:
    grouped: dict[int, list[TensorStats]] = defaultdict(list)
    for stats in all_stats:
        if stats.layer is not None:
            grouped[stats.layer].append(stats)
    counts: dict[int, int] = defaultdict(int)
    for finding in findings:
        index = _finding_layer(finding)
        if index is not None:
            counts[index] += 1
    summaries = []
    for index in sorted(grouped):
        tensors = grouped[index]
        numel = sum(s.numel for s in tensors)
        summaries.append(LayerSummary(
            index=index,
            parameters=numel,
            nan=sum(s.nan for s in tensors),
            inf=sum(s.inf for s in tensors),
            zero_share=sum(s.zeros for s in tensors) / numel if numel else 0.0,
            max_abs=max(s.max_abs for s in tensors),
            findings=counts[index],
        ))
    return summaries


def _finding_layer(finding: Finding) -> int | None:
    # "model.layers.3.self_attn" has no trailing dot; add one so that it matches like a tensor name
    return layer_index(finding.location + ".")


def build_report(all_stats: list[TensorStats], structure: Structure | None, structure_problems: list[Finding]) -> HealthReport:
    """A report from scanned tensors and a structure check (forward and PPL are added by the caller)."""
    findings = weight_findings(all_stats) + list(structure_problems)
    numel = sum(s.numel for s in all_stats)
    largest = max(all_stats, key=lambda s: s.max_abs, default=None)
    return HealthReport(
        findings=findings,
        num_parameters=numel,
        num_tensors=len(all_stats),
        nan=sum(s.nan for s in all_stats),
        inf=sum(s.inf for s in all_stats),
        zero_share=sum(s.zeros for s in all_stats) / numel if numel else 0.0,
        max_abs=largest.max_abs if largest else 0.0,
        max_abs_tensor=largest.name if largest else "",
        layers=_layer_summaries(all_stats, findings),
        structure=structure,
    )


def add_forward(report: HealthReport, model: nn.Module, tokenizer: Any = None) -> None:
    report.forward = forward_test(model, tokenizer)
    new = forward_findings(report.forward, weights_have_faults=bool(report.nan or report.inf or report.huge_count))
    report.findings.extend(new)
    for finding in new:
        for layer in report.layers:
            if layer.index == _finding_layer(finding):
                layer.findings += 1


def model_head_dim(model: nn.Module) -> int | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers:
        return getattr(layers[0].self_attn, "head_dim", None)
    return None


def preflight_check(model: nn.Module, tokenizer: Any = None, *, forward: bool = True) -> HealthReport:
    """What finetune and recipe run before they start: weights, GQA/shapes and (by default) a forward test.

    `report.ok` is False when training would be unsafe (NaN, Inf, huge values,
    broken GQA or shapes, non-finite forward); `report.findings` says where and
    `report.advice` what to do.
    """
    parameters = dict(model.named_parameters())  # tied weights appear once, so lm_head is absent when tied
    all_stats = [tensor_stats(name, tensor) for name, tensor in parameters.items()]
    shapes = {name: list(tensor.shape) for name, tensor in parameters.items()}
    config = model.config.to_dict() if hasattr(model, "config") else {}
    structure, problems = read_structure(shapes, config, head_dim=model_head_dim(model), config_role="none")
    report = build_report(all_stats, structure, problems)
    if forward:
        add_forward(report, model, tokenizer)
    return report
