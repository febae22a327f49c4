"""Distillation: the KD loss is the KL to the teacher, the guard catches a broken teacher, full and LoRA runs learn the
teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from single_thread import one_thread  # noqa: F401  (autouse fixture)
from torch.distributions import Categorical, kl_divergence

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.events import GuardAlert, RunStarted, StepMetrics
from llmprune.engine.data import random_windows, tokenize
from llmprune.engine.finetune.distill import Distiller, kd_loss
from llmprune.engine.finetune.train import FinetuneConfig, TrainingControl, finetune_model


@pytest.fixture(scope="module")
def token_stream(tiny_tokenizer):
    from pydoc_data.topics import topics

    return tokenize(tiny_tokenizer, "\n\n".join(topics[key] for key in sorted(topics))[:60_000], use_cache=False)


def windows(stream, count=8, seq_len=32, seed=0):
    return random_windows(stream, count, seq_len, seed, "pydoc")


def config(tmp_path, **overrides) -> FinetuneConfig:
    values = dict(
        out=str(tmp_path / "run"),
        samples=8,
        seq_len=32,
        lr=1e-3,
        schedule="constant",
        save_every=100,
        teacher="tiny teacher",
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def student():
    """A smaller model than the teacher (2 layers of 4), with the same vocabulary: a stand-in for a pruned one."""
    return make_tiny_model(seed=1, layers=2)


def teacher():
    return make_tiny_model(seed=0)


@torch.no_grad()
def kl_to_teacher(model, teacher_model, ids) -> float:
    return float(kd_loss(model(input_ids=ids).logits, teacher_model(input_ids=ids).logits))


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_is_the_kl_to_the_teacher(temperature):
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    expected = kl_divergence(
        Categorical(logits=teacher_logits / temperature), Categorical(logits=student_logits / temperature)
    ).mean()
    assert float(kd_loss(student_logits, teacher_logits, temperature)) == pytest.approx(
        float(expected) * temperature**2, rel=1e-5
    )
    assert float(kd_loss(teacher_logits, teacher_logits, temperature)) == pytest.approx(0.0, abs=1e-6)
    # keeping every logit is the exact KL
    assert float(kd_loss(student_logits, teacher_logits, temperature, top_k=50)) == pytest.approx(
        float(expected) * temperature**2, rel=1e-5
    )


def test_top_k_kd_loss_is_the_kl_over_the_top_k_tokens_and_one_bucket_for_the_rest():
    torch.manual_seed(1)
    student_logits, teacher_logits, k, temperature = torch.randn(3, 4, 40) * 2, torch.randn(3, 4, 40) * 2, 6, 2.0
    p, q = torch.softmax(teacher_logits / temperature, -1), torch.softmax(student_logits / temperature, -1)
    index = p.topk(k, dim=-1).indices
    p_k, q_k = p.gather(-1, index), q.gather(-1, index)
    bucketed_p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    bucketed_q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    expected = kl_divergence(Categorical(probs=bucketed_p), Categorical(probs=bucketed_q)).mean() * temperature**2
    got = float(kd_loss(student_logits, teacher_logits, temperature, top_k=k))
    assert got == pytest.approx(float(expected), rel=1e-4)
    assert 0 < got <= float(kd_loss(student_logits, teacher_logits, temperature))  # coarser never exceeds the full KL
    assert float(kd_loss(teacher_logits, teacher_logits, temperature, top_k=k)) == pytest.approx(0.0, abs=1e-6)


def test_a_non_finite_teacher_logit_makes_the_kd_loss_nan():
    student_logits, teacher_logits = torch.randn(1, 3, 20), torch.randn(1, 3, 20)
    for value in (float("nan"), float("inf")):
        broken = teacher_logits.clone()
        broken[0, 1, 4] = value
        assert torch.isnan(kd_loss(student_logits, broken)) and torch.isnan(kd_loss(student_logits, broken, top_k=5))


def test_distiller_mixes_kd_and_lm_by_the_weight(tiny_tokenizer, token_stream):
    ids = windows(token_stream, count=2).ids
    model, teacher_model = student(), teacher()
    parts = Distiller(teacher_model, temperature=2.0, weight=0.3).loss(model, ids)
    with torch.no_grad():
        expected_kd = kd_loss(model(input_ids=ids).logits, teacher_model(input_ids=ids).logits, 2.0)
        expected_lm = model(input_ids=ids, labels=ids).loss
    assert float(parts.kd.detach()) == pytest.approx(float(expected_kd), rel=1e-5)
    assert float(parts.lm.detach()) == pytest.approx(float(expected_lm), rel=1e-5)
    assert float(parts.total.detach()) == pytest.approx(0.3 * float(expected_kd) + 0.7 * float(expected_lm), rel=1e-5)
    assert parts.total.requires_grad and not any(p.requires_grad for p in teacher_model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kd_temperature": 0.0}, "--kd-temperature"),
        ({"kd_weight": 1.5}, "--kd-weight"),
        ({"kd_top_k": 0}, "--kd-top-k"),
    ],
)
def test_bad_kd_settings_are_user_errors(overrides, message):
    with pytest.raises(UserInputError, match=message):
        FinetuneConfig(**overrides).validate()


# ---------------------------------------------------------------- training with a teacher


@pytest.mark.parametrize("method", ["full", "lora"])
def test_distillation_brings_the_student_closer_to_the_teacher(tmp_path, tiny_tokenizer, token_stream, method):
    model, teacher_model = student(), teacher()
    held_out = windows(token_stream, count=4, seed=7).ids
    before = kl_to_teacher(model, teacher_model, held_out)
    settings = config(tmp_path, method=method, samples=16, lr=1e-2 if method == "lora" else 3e-3)
    result = finetune_model(
        model, tiny_tokenizer, settings, train_windows=windows(token_stream, count=16), teacher=teacher_model
    )
    assert result.status == "completed" and result.steps == 16
    after = kl_to_teacher(model.eval(), teacher_model, held_out)  # peft injects LoRA into `model`'s own modules
    assert after < 0.85 * before
    lines = metrics(result.run_dir)
    assert lines[-1]["kd_loss"] < lines[0]["kd_loss"]
    assert all(line["loss"] == pytest.approx(line["kd_loss"]) for line in lines)  # weight 1: KD only


def test_weighted_top_k_distillation_records_both_parts(tmp_path, tiny_tokenizer, token_stream):
    events = []
    settings = config(tmp_path, kd_weight=0.8, kd_temperature=2.0, kd_top_k=16)
    result = finetune_model(
        student(), tiny_tokenizer, settings, events.append, train_windows=windows(token_stream), teacher=teacher()
    )
    lines = metrics(result.run_dir)
    assert result.status == "completed" and all(line["applied"] for line in lines)
    for line in lines:
        assert line["loss"] == pytest.approx(0.8 * line["kd_loss"] + 0.2 * line["lm_loss"], rel=1e-5)
    assert lines[-1]["kd_loss"] < lines[0]["kd_loss"]
    started = next(e for e in events if isinstance(e, RunStarted))
    assert started.teacher == "tiny teacher (T=2, KD weight 0.8, top 16 logits)"
    saved = json.loads((Path(result.run_dir) / "run.json").read_text())["config"]
    assert (saved["teacher"], saved["kd_temperature"], saved["kd_weight"], saved["kd_top_k"]) == (
        "tiny teacher",
        2.0,
        0.8,
        16,
    )


class NanInTeacherAt:
    """Makes the teacher's k-th forward pass (counted once training starts) return NaN logits."""

    def __init__(self, teacher_model, call: int, value: float = float("nan")):
        self.call, self.calls, self.armed, self.value = call, 0, False, value
        teacher_model.lm_head.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if self.armed:
            self.calls += 1
            if self.calls == self.call:
                output = output.clone()
                output[0, 3, 5] = self.value
                return output
        return output

    def listener(self, event):
        if isinstance(event, RunStarted):
            self.armed = True


@pytest.mark.parametrize("value, top_k", [(float("nan"), None), (float("inf"), None), (float("-inf"), 16)])
def test_a_nan_in_the_teachers_logits_at_step_k_is_caught_at_step_k(
    tmp_path, tiny_tokenizer, token_stream, value, top_k
):
    teacher_model = teacher()
    fault = NanInTeacherAt(teacher_model, call=4, value=value)
    events = []

    def listener(event):
        fault.listener(event)
        events.append(event)

    result = finetune_model(
        student(),
        tiny_tokenizer,
        config(tmp_path, on_nan="skip", kd_top_k=top_k),
        listener,
        train_windows=windows(token_stream),
        teacher=teacher_model,
    )
    alerts = [e for e in events if isinstance(e, GuardAlert)]
    assert [(a.step, a.kind, a.action) for a in alerts] == [(4, "teacher_logits", "skip")]
    assert "teacher" in alerts[0].message
    lines = metrics(result.run_dir)
    assert [line["applied"] for line in lines] == [True, True, True, False, True, True, True, True]
    assert result.status == "completed"


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_tokenizer, token_stream):
    with pytest.raises(UserInputError, match="vocabulary"):
        finetune_model(
            student(),
            tiny_tokenizer,
            config(tmp_path),
            train_windows=windows(token_stream),
            teacher=make_tiny_model(vocab=400),
        )


def test_resume_keeps_the_teacher_settings(tmp_path, tiny_tokenizer, token_stream):
    data = windows(token_stream)
    control = TrainingControl()

    def stop_after_three(event):
        if isinstance(event, StepMetrics) and event.step == 3:
            control.request_stop()

    straight = finetune_model(student(), tiny_tokenizer, config(tmp_path / "a"), train_windows=data, teacher=teacher())
    stopped = finetune_model(
        student(),
        tiny_tokenizer,
        config(tmp_path / "b"),
        stop_after_three,
        control=control,
        train_windows=data,
        teacher=teacher(),
    )
    assert stopped.steps == 3
    with pytest.raises(UserInputError, match="kd_temperature"):
        finetune_model(
            student(),
            tiny_tokenizer,
            config(tmp_path / "b", resume=True, kd_temperature=3.0),
            train_windows=data,
            teacher=teacher(),
        )
    resumed = finetune_model(
        student(), tiny_tokenizer, config(tmp_path / "b", resume=True), train_windows=data, teacher=teacher()
    )
    assert resumed.steps == 8
    for a, b in zip(metrics(straight.run_dir), metrics(resumed.run_dir), strict=False):
        assert (a["step"], a["kd_loss"], a["lm_loss"]) == pytest.approx(
            (b["step"], b["kd_loss"], b["lm_loss"]), rel=1e-5
        )


def test_without_a_teacher_no_kd_part_is_recorded(tmp_path, tiny_tokenizer, token_stream):
    result = finetune_model(
        student(), tiny_tokenizer, config(tmp_path, teacher=None), train_windows=windows(token_stream)
    )
    assert all(
        line["kd_loss"] is None and line["lm_loss"] == pytest.approx(line["loss"]) for line in metrics(result.run_dir)
    )


def test_the_memory_estimate_counts_teacher_weights_and_the_students_training_state(monkeypatch):
    from llmprune.engine.core import device
    from llmprune.engine.finetune.distill import teacher_fits

    monkeypatch.setattr(device, "available_memory_bytes", lambda _device: 10 * 2**30)
    cpu = torch.device("cpu")
    fit = teacher_fits(135_000_000, 107_000_000, cpu)
    # fp32 teacher (4 bytes) + full training of the student (16 bytes), with a 25 % margin
    assert fit.needed_bytes == int((135_000_000 * 4 + 107_000_000 * 16) * 1.25) and fit.fits
    assert teacher_fits(135_000_000, 107_000_000, cpu, "lora").needed_bytes == int(
        (135_000_000 * 4 + 107_000_000 * 4) * 1.25
    )
    big = teacher_fits(8_000_000_000, 6_500_000_000, cpu)
    assert not big.fits and "does not fit" in big.reason
