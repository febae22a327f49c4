"""Health checks of a model and perplexity verdicts.

`preflight_check(model, tokenizer)` is what finetune and recipe call before
they start: weights scan (NaN, Inf, huge values, zeros), GQA and shape check,
and a short forward test. `ppl_verdict(ppl, base_ppl)` judges a perplexity.
`llmprune doctor` (engine.doctor) runs the same checks on files without
building the model first.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from llmprune.engine.core.findings import SEVERITIES, Advice, Finding
from llmprune.engine.diagnose.forward_probe import ForwardResult, forward_test
from llmprune.engine.diagnose.tensor_scan import TensorStats, huge_tensors, layer_index, tensor_stats
from llmprune.engine.diagnose.verdicts import VERDICT_LABELS, PplCheck, Verdict, ppl_verdict
from llmprune.engine.io.structure import Structure, is_adapter_tensor, read_structure, structure_shapes

__all__ = [
    "Finding",
    "HealthReport",
    "LayerSummary",
    "Verdict",
    "PplCheck",
    "preflight_check",
    "ppl_verdict",
    "weight_findings",
    "forward_findings",
    "build_report",
    "VERDICT_LABELS",
]

# A weight with at least this share of exact zeros looks masked rather than pruned.
ZERO_SHARE_WARNING = 0.5
# Above this share of exact zeros over the whole model, the summary stops calling it normal.
ZERO_SHARE_NORMAL = 0.10


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
    tensors: list[TensorStats] = field(default_factory=list)
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

    def _tensors_with(self, check: str) -> int:
        return sum(1 for finding in self.findings if finding.check == check)

    @property
    def huge_count(self) -> int:
        return self._tensors_with("huge")

    def summary(self) -> list[tuple[bool, str]]:
        """The one-glance lines: (passed, text)."""
        lines = [
            (
                self.nan == 0,
                "no NaN" if self.nan == 0 else f"NaN in {self._tensors_with('nan')} tensor(s) ({self.nan:,} values)",
            ),
            (
                self.inf == 0,
                "no Inf" if self.inf == 0 else f"Inf in {self._tensors_with('inf')} tensor(s) ({self.inf:,} values)",
            ),
            (
                self.zero_share < ZERO_SHARE_NORMAL,
                (
                    f"zero share {'normal' if self.zero_share < ZERO_SHARE_NORMAL else 'high'}:"
                    f" {100 * self.zero_share:.1f} %"
                ),
            ),
            (
                self.huge_count == 0,
                (
                    "no abnormally large values"
                    if self.huge_count == 0
                    else f"{self.huge_count} tensor(s) with abnormally large values"
                ),
            ),
        ]
        if self.structure is not None:
            gqa_errors = [f for f in self.findings if f.check == "gqa"]
            ratios = ", ".join(f"{r:g}" for r in self.structure.gqa_ratios) or "?"
            shape_errors = [f for f in self.findings if f.check in ("shape", "fit") and f.severity == "error"]
            lines.append(
                (
                    not gqa_errors,
                    (
                        f"GQA valid (heads:kv_heads {ratios}:1)"
                        if not gqa_errors
                        else f"GQA broken in {len(gqa_errors)} layer(s)"
                    ),
                )
            )
            lines.append(
                (not shape_errors, "shapes consistent" if not shape_errors else f"{len(shape_errors)} shape problem(s)")
            )
        if self.forward is not None:
            lines.append(
                (
                    self.forward.ok,
                    (
                        "forward pass finite"
                        if self.forward.ok
                        else "forward pass not finite"
                        if self.forward.error is None
                        else "forward pass failed"
                    ),
                )
            )
        if self.ppl is not None:
            lines.append(
                (
                    self.ppl.verdict.label in ("healthy", "acceptable"),
                    f"PPL {self.ppl.ppl:.2f}: {self.ppl.verdict.label} ({self.ppl.verdict.scale} scale)",
                )
            )
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
            "tensors": [stats.to_dict() for stats in self.tensors],
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
            findings.append(
                Finding(
                    "error",
                    "nan",
                    stats.name,
                    f"{stats.nan:,} NaN of {stats.numel:,} values{where}",
                    [Advice.RESTORE, Advice.LOWER_LR, Advice.BF16],
                )
            )
        if stats.inf:
            findings.append(
                Finding(
                    "error",
                    "inf",
                    stats.name,
                    f"{stats.inf:,} Inf of {stats.numel:,} values{where}",
                    [Advice.BF16, Advice.RESTORE, Advice.LOWER_LR],
                )
            )
        # LoRA's B matrices start at zero by design
        if len(stats.shape) >= 2 and stats.zero_share >= ZERO_SHARE_WARNING and not is_adapter_tensor(stats.name):
            findings.append(
                Finding(
                    "warning",
                    "zeros",
                    stats.name,
                    f"{100 * stats.zero_share:.1f} % of the values are exactly zero{where}",
                    [Advice.REMOVE_MASKED, Advice.REPRUNE],
                )
            )
    for flagged in huge_tensors(all_stats):
        where = f" (layer {flagged.stats.layer})" if flagged.stats.layer is not None else ""
        findings.append(
            Finding(
                "error",
                "huge",
                flagged.stats.name,
                f"abnormally large values{where}: {flagged.rule}",
                [Advice.LOWER_LR, Advice.BF16, Advice.RESTORE],
            )
        )
    return findings


def forward_findings(result: ForwardResult, weights_have_faults: bool) -> list[Finding]:
    if result.ok:
        return []
    if result.error is not None:
        return [
            Finding(
                "error",
                "forward",
                result.first_nonfinite_module or "model",
                f"the forward pass failed: {result.error}",
                [Advice.CHECK_CONFIG, Advice.RESAVE],
            )
        ]
    location = result.first_nonfinite_module or "logits"
    advice = [Advice.look_at(location)]
    advice += [Advice.RESTORE] if weights_have_faults else [Advice.BF16, Advice.PROTECT_ENDS, Advice.REPRUNE_LOWER]
    return [
        Finding(
            "error",
            "forward",
            location,
            f"the output goes non-finite first at {location} ({result.nan:,} NaN, {result.inf:,} Inf in the logits)",
            advice,
        )
    ]


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
        summaries.append(
            LayerSummary(
                index=index,
                parameters=numel,
                nan=sum(s.nan for s in tensors),
                inf=sum(s.inf for s in tensors),
                zero_share=sum(s.zeros for s in tensors) / numel if numel else 0.0,
                max_abs=max(s.max_abs for s in tensors),
                findings=counts[index],
            )
        )
    return summaries


def _finding_layer(finding: Finding) -> int | None:
    # "model.layers.3.self_attn" has no trailing dot; add one so that it matches like a tensor name
    return layer_index(finding.location + ".")


def build_report(
    all_stats: list[TensorStats], structure: Structure | None, structure_problems: list[Finding]
) -> HealthReport:
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
        tensors=list(all_stats),
        structure=structure,
    )


def add_forward(
    report: HealthReport, model: nn.Module | None, tokenizer: Any = None, result: ForwardResult | None = None
) -> None:
    """The forward test's result and findings (`result`: one already measured, e.g. streamed)."""
    report.forward = result if result is not None else forward_test(model, tokenizer)
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
    shapes = structure_shapes({name: tensor.shape for name, tensor in parameters.items()})
    config = model.config.to_dict() if hasattr(model, "config") else {}
    structure, problems = read_structure(shapes, config, head_dim=model_head_dim(model), config_role="none")
    report = build_report(all_stats, structure, problems)
    if forward:
        add_forward(report, model, tokenizer)
    return report


def require_healthy(report: HealthReport, action: str, force: bool = False) -> HealthReport:
    """Stop `action` (e.g. "pruning") on a model whose weights are unsafe, unless forced.

    Raises CheckFailedError (exit code 1) naming the findings; with `force` the report is returned as is.
    """
    from llmprune.engine.core.errors import CheckFailedError

    if report.ok or force:
        return report
    errors = report.by_severity("error")
    raise CheckFailedError(
        f"the model failed the weight health check, so {action} was not started ({len(errors)} problem(s))",
        "fix what `llmprune doctor` reports for this model, or pass --force to go on anyway",
        [f"{finding.location}: {finding.message}" for finding in errors],
    )


def weight_health(model: nn.Module) -> HealthReport:
    """The weight and structure part of preflight_check (no forward pass): NaN, Inf, huge values, GQA, shapes."""
    return preflight_check(model, forward=False)
