"""`llmprune doctor`'s engine: diagnose a checkpoint before anyone trains on it.

Weights and structure are checked from the tensors alone (so a file whose shapes
fit no model is still diagnosed); the model is built only for --test-forward
and --ppl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmprune.engine.core.device import Placement, choose_placement
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.findings import Advice, Finding
from llmprune.engine.core.progress import CountProgress
from llmprune.engine.data import check_seq_len_fits, check_window_options
from llmprune.engine.diagnose.health import HealthReport, PplCheck, add_forward, build_report, ppl_verdict
from llmprune.engine.diagnose.tensor_scan import tensor_stats
from llmprune.engine.io.load_options import LoadOptions
from llmprune.engine.io.models import LoadedModel, load_model
from llmprune.engine.io.structure import read_structure, structure_shapes
from llmprune.engine.io.weight_source import WeightSource, iter_tensors, locate_weights

DEFAULT_DATASET = "wikitext2"
DEFAULT_SEQ_LEN = 2048
_PPL_SEVERITY = {"broken": "error", "too high": "warning", "acceptable": "info"}


@dataclass
class DoctorConfig(LoadOptions):
    """What `llmprune doctor` checks."""

    test_forward: bool = False
    """Run a short prompt through the model and locate the first non-finite module."""
    ppl: bool = False
    """Measure perplexity and give a verdict."""
    dataset: str | None = None
    """Evaluation text (default: the one recorded by prune, else wikitext2)."""
    seq_len: int | None = None
    """Tokens per window (default: recorded by prune, else 2048)."""
    max_windows: int | None = None
    """Only the first N windows (default: recorded by prune, else all)."""
    batch_size: int = 1
    """Windows per forward pass."""
    base_ppl: float | None = None
    """The base model's PPL on the same data, for a relative verdict (default: recorded by prune)."""
    stream: bool | None = None
    """--test-forward with the layers streamed from disk (one in memory at a time). None: when the model would not fit.
    """

    def validate(self) -> None:
        check_window_options(self.seq_len, self.max_windows, self.batch_size)
        if self.base_ppl is not None and not (self.base_ppl > 0 and math.isfinite(self.base_ppl)):
            raise UserInputError(
                f"--base-ppl must be a positive number, got {self.base_ppl}",
                "pass the base model's PPL, e.g. --base-ppl 12.3",
            )


@dataclass
class DoctorReport(HealthReport):
    """A HealthReport plus what was diagnosed and how it was read."""

    model: str = ""
    kind: str = ""
    source: str = ""
    config_origin: str | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "kind": self.kind,
            "source": self.source,
            "config": self.config_origin,
            "exit_code": self.exit_code,
            **super().to_dict(),
        }


def _scan(source: WeightSource, config: DoctorConfig) -> DoctorReport:
    all_stats, shapes = [], {}
    for name, tensor in iter_tensors(source, config.trust_pickle):
        all_stats.append(tensor_stats(name, tensor))
        shapes[name] = list(tensor.shape)
    if not all_stats:
        raise UserInputError(f"{config.model} holds no tensors", "pass a model directory or a weights file")
    structure, problems = read_structure(structure_shapes(shapes), source.config, config_role=source.config_role)
    if structure.num_layers == 0:
        raise UserInputError(
            f"{config.model} is not a model: none of its {len(shapes)} tensor(s) belongs to a decoder layer"
            " (model.layers.N...)",
            "pass a Llama-style checkpoint (a model folder or its weights file)",
        )
    misfit = [p for p in problems if p.check == "fit"]
    if misfit:
        raise UserInputError(
            f"{source.source} does not fit {source.config_origin}: {misfit[0].message}",
            "pass the --base-model this checkpoint was made from",
        )
    report = build_report(all_stats, structure, problems)
    return DoctorReport(
        **vars(report), model=config.model, kind=source.kind, source=source.source, config_origin=source.config_origin
    )


def _build_model(
    source: WeightSource, config: DoctorConfig, report: DoctorReport, placement: Placement
) -> LoadedModel | None:
    """The model for the forward test and PPL; None (with a finding) when the faults found make it unbuildable."""
    if source.loaded is not None:
        return source.loaded
    try:
        return load_model(
            config.model, base_model=config.base_model, trust_pickle=config.trust_pickle, placement=placement
        )
    except UserInputError as error:
        if report.ok:  # nothing explains the failure: the input itself is the problem
            raise
        report.findings.append(
            Finding(
                "error",
                "forward",
                "model",
                f"the model cannot be built from these tensors: {error.problem}",
                [Advice.RESAVE, Advice.REPRUNE],
            )
        )
        return None


def _stream_source(config: DoctorConfig, placement: Placement):
    """The safetensors directory to stream the forward test from (None: build the model in memory)."""
    if config.stream is False:
        return None
    from llmprune.engine.walk.streaming import should_stream, stream_source

    source = stream_source(config.model)
    if config.stream and source is None:
        raise UserInputError(
            f"--stream needs a model directory with safetensors weights, not {config.model}", "drop --stream"
        )
    return source if source is not None and (config.stream or should_stream(source, placement.device)) else None


def _streamed_forward(report: DoctorReport, directory, placement: Placement) -> None:
    from transformers import AutoTokenizer

    from llmprune.engine.diagnose.forward_probe import streamed_forward_test
    from llmprune.engine.walk.streaming import StreamedLayers

    try:
        store = StreamedLayers(directory, placement.device, placement.dtype)
    except (UserInputError, ValueError, OSError) as error:
        if report.ok:
            raise
        report.findings.append(
            Finding(
                "error",
                "forward",
                "model",
                f"the model cannot be built from these tensors: {error}",
                [Advice.RESAVE, Advice.REPRUNE],
            )
        )
        return
    tokenizer = (
        AutoTokenizer.from_pretrained(str(directory)) if (directory / "tokenizer_config.json").is_file() else None
    )
    add_forward(report, None, result=streamed_forward_test(store, tokenizer))


def _ppl_settings(config: DoctorConfig, provenance: dict) -> tuple[str, int, int | None]:
    recorded = provenance.get("ppl_after") is not None
    dataset = config.dataset or (provenance.get("dataset") if recorded else None) or DEFAULT_DATASET
    seq_len = config.seq_len or (provenance.get("seq_len") if recorded else None) or DEFAULT_SEQ_LEN
    max_windows = (
        config.max_windows if config.max_windows is not None else (provenance.get("max_windows") if recorded else None)
    )
    return dataset, int(seq_len), max_windows


def _recorded_base_ppl(provenance: dict, settings: tuple[str, int, int | None]) -> float | None:
    """prune's ppl_before, only when it was measured on the same text, window length and window count."""
    if provenance.get("ppl_before") is None:
        return None
    recorded = (provenance.get("dataset"), provenance.get("seq_len"), provenance.get("max_windows"))
    return float(provenance["ppl_before"]) if recorded == settings else None


def _measure_ppl(
    loaded: LoadedModel, config: DoctorConfig, provenance: dict, report: DoctorReport, progress: CountProgress | None
) -> PplCheck:
    from llmprune.engine.data import load_evaluation_windows
    from llmprune.engine.evaluate import perplexity

    if loaded.tokenizer is None:
        raise UserInputError(
            f"{config.model} has no tokenizer, so its perplexity cannot be measured",
            "save the tokenizer next to the weights or use --base-model",
        )
    settings = _ppl_settings(config, provenance)
    dataset, seq_len, max_windows = settings
    check_seq_len_fits(seq_len, loaded.model)
    windows = load_evaluation_windows(loaded.tokenizer, dataset, seq_len, max_windows)
    measured = perplexity(loaded.model, windows, config.batch_size, progress)
    base = config.base_ppl if config.base_ppl is not None else _recorded_base_ppl(provenance, settings)
    if base is None and provenance.get("ppl_before") is not None:
        report.findings.append(
            Finding(
                "info",
                "ppl",
                "perplexity",
                f"the base PPL recorded by prune ({provenance['ppl_before']:.2f}) was measured on"
                f" {provenance.get('dataset')} seq_len {provenance.get('seq_len')} max_windows"
                f" {provenance.get('max_windows')}, not on these settings: absolute scale used",
                ["rerun without --dataset/--seq-len/--max-windows to compare with the base, or pass --base-ppl"],
            )
        )
    return PplCheck(
        measured.ppl, dataset, seq_len, measured.windows, "measured", ppl_verdict(measured.ppl, base, seq_len=seq_len)
    )


def _recorded_ppl(config: DoctorConfig, provenance: dict) -> PplCheck | None:
    """prune's own before/after PPL, judged without re-measuring (for a pruned directory without --ppl)."""
    if provenance.get("ppl_after") is None:
        return None
    base = config.base_ppl if config.base_ppl is not None else provenance.get("ppl_before")
    verdict = ppl_verdict(float(provenance["ppl_after"]), base, seq_len=provenance.get("seq_len"))
    return PplCheck(
        float(provenance["ppl_after"]),
        str(provenance.get("dataset")),
        provenance.get("seq_len"),
        provenance.get("max_windows"),
        "recorded by prune",
        verdict,
    )


def _ppl_finding(check: PplCheck) -> Finding | None:
    severity = _PPL_SEVERITY.get(check.verdict.label)
    if severity is None:
        return None
    return Finding(
        severity, "ppl", f"perplexity ({check.source})", check.verdict.explanation, list(check.verdict.advice)
    )


def run_doctor(config: DoctorConfig, progress: CountProgress | None = None) -> DoctorReport:
    """Scan the weights and structure of `config.model`, then (if asked) run it; `report.exit_code` is 0 or 1."""
    config.validate()
    placement = choose_placement(config.device, config.dtype)
    source = locate_weights(
        config.model, base_model=config.base_model, trust_pickle=config.trust_pickle, placement=placement
    )
    report = _scan(source, config)
    stream_from = _stream_source(config, placement) if config.test_forward and not config.ppl else None
    if stream_from is not None:
        _streamed_forward(report, stream_from, placement)
    elif config.test_forward or config.ppl:
        loaded = _build_model(source, config, report, placement)
        if loaded is not None and config.test_forward:
            add_forward(report, loaded.model, loaded.tokenizer)
        if loaded is not None and config.ppl:
            report.ppl = _measure_ppl(loaded, config, source.provenance, report, progress)
    if report.ppl is None:
        report.ppl = _recorded_ppl(config, source.provenance)
    finding = _ppl_finding(report.ppl) if report.ppl else None
    if finding:
        report.findings.append(finding)
    return report
