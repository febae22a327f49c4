"""preflight_check and ppl_verdict on tiny random Llamas with planted faults."""

import math

import pytest
import torch

from llmprune.engine.diagnose.health import Finding, HealthReport, ppl_verdict, preflight_check
from tests.conftest import make_tiny_model


def _errors(report: HealthReport, check: str) -> list[Finding]:
    return [f for f in report.findings if f.check == check and f.severity == "error"]


def test_healthy_tiny_model_passes_clean(tiny_model, tiny_tokenizer):
    report = preflight_check(tiny_model, tiny_tokenizer)
    assert report.ok, report.findings
    assert report.findings == []
    assert report.num_parameters == sum(p.numel() for p in tiny_model.parameters())
    assert report.forward.ok and report.forward.output_shape[-1] == 384
    assert report.structure.gqa_ratios == [4.0]
    assert [layer.kv_heads for layer in report.structure.layers] == [2, 2, 2, 2]
    assert all(passed for passed, _ in report.summary())


def test_nan_in_one_layer_is_named_and_located_by_the_forward_hooks(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[2].mlp.down_proj.weight[0, :3] = float("nan")
    report = preflight_check(tiny_model)
    assert not report.ok
    [nan] = _errors(report, "nan")
    assert nan.location == "model.layers.2.mlp.down_proj.weight"
    assert "3 NaN" in nan.message
    [forward] = _errors(report, "forward")
    assert forward.location == "model.layers.2.mlp.down_proj"
    assert report.forward.first_nonfinite_module == "model.layers.2.mlp.down_proj"
    assert [layer.index for layer in report.layers if layer.findings] == [2]
    assert report.advice and report.advice[0].startswith("do not train")


def test_inf_in_another_layer(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[1].self_attn.k_proj.weight[4, 4] = float("inf")
    report = preflight_check(tiny_model, forward=False)
    [inf] = _errors(report, "inf")
    assert inf.location == "model.layers.1.self_attn.k_proj.weight"
    assert report.inf == 1 and report.forward is None
    assert "bf16" in report.advice[0]


def test_tensor_scaled_by_1e4_is_huge_and_only_that_one(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[3].self_attn.o_proj.weight.mul_(1e4)
    report = preflight_check(tiny_model, forward=False)
    assert [f.location for f in report.findings if f.check == "huge"] == ["model.layers.3.self_attn.o_proj.weight"]
    assert not report.ok


def test_finite_weights_that_overflow_in_activations_are_located_by_the_forward_test():
    # no NaN/Inf in any weight, yet up_proj's output overflows float32
    model = make_tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(3e38)
    report = preflight_check(model)
    assert report.nan == 0 and report.inf == 0
    assert report.forward.first_nonfinite_module == "model.layers.1.mlp.up_proj"
    assert [f.location for f in _errors(report, "forward")] == ["model.layers.1.mlp.up_proj"]


def test_gqa_breaking_layer_is_named(tiny_model):
    # 7 query heads over 2 KV heads: the q:kv ratio is no longer whole in layer 1
    attn = tiny_model.model.layers[1].self_attn
    head_dim = attn.head_dim
    attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight[: 7 * head_dim].clone())
    attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, : 7 * head_dim].clone())
    report = preflight_check(tiny_model, forward=False)
    [gqa] = _errors(report, "gqa")
    assert gqa.location == "model.layers.1.self_attn"
    assert "7 heads / 2 KV heads" in gqa.message
    assert not report.ok


def test_mostly_zero_weight_is_a_warning_not_an_error(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.gate_proj.weight[:100] = 0
    report = preflight_check(tiny_model, forward=False)
    [zeros] = [f for f in report.findings if f.check == "zeros"]
    assert zeros.severity == "warning" and zeros.location == "model.layers.0.mlp.gate_proj.weight"
    assert report.ok


def test_report_to_dict_is_json_ready(tiny_model):
    import json

    data = json.loads(json.dumps(preflight_check(tiny_model).to_dict()))
    assert data["ok"] is True and data["forward"]["ok"] is True
    assert data["structure"]["layers"][0]["heads"] == 8


@pytest.mark.parametrize(
    "ppl,label",
    [
        (9.0, "healthy"),
        (14.99, "healthy"),
        (15.0, "acceptable"),
        (24.0, "acceptable"),
        (30.0, "too high"),
        (50.0, "broken"),
        (math.inf, "broken"),
        (math.nan, "broken"),
    ],
)
def test_absolute_verdict(ppl, label):
    verdict = ppl_verdict(ppl)
    assert verdict.label == label and verdict.scale == "absolute"
    assert "Llama-3-8B" in verdict.explanation


@pytest.mark.parametrize("ppl,label", [(12.0, "healthy"), (16.0, "acceptable"), (30.0, "too high"), (60.0, "broken")])
def test_relative_verdict(ppl, label):
    verdict = ppl_verdict(ppl, base_ppl=12.0)
    assert verdict.label == label and verdict.scale == "relative"
    assert verdict.ratio == pytest.approx(ppl / 12.0)


def test_relative_scale_is_used_even_when_absolute_would_differ():
    # a small model's healthy base PPL is far above 15; the ratio decides
    assert ppl_verdict(40.0, base_ppl=38.0).label == "healthy"
    assert ppl_verdict(40.0).label == "too high"
    assert ppl_verdict(40.0, base_ppl=38.0).advice == []
    assert ppl_verdict(400.0, base_ppl=38.0).unsafe


def test_lora_wrapped_model_is_checked_through_its_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = preflight_check(model)
    # LoRA B matrices start at zero and PEFT renames the base weights: neither is a finding
    assert report.ok and report.findings == []
    assert [layer.kv_heads for layer in report.structure.layers] == [2, 2, 2, 2]
    with torch.no_grad():
        model.base_model.model.model.layers[2].self_attn.q_proj.lora_A["default"].weight[0, 0] = float("nan")
    report = preflight_check(model)
    assert [f.location for f in report.findings if f.check == "nan"] == [
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight"
    ]
    assert report.forward.first_nonfinite_module.endswith("layers.2.self_attn.q_proj.lora_A.default")


def test_health_report_renders_without_a_terminal(tiny_model):
    import io

    from rich.console import Console

    from llmprune.ui.doctor_report import health_report

    with torch.no_grad():
        tiny_model.model.layers[0].self_attn.v_proj.weight[1, 1] = float("nan")
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(health_report(preflight_check(tiny_model)))
    text = console.export_text()
    assert "model.layers.0.self_attn.v_proj.weight" in text and "unsafe to train on" in text
