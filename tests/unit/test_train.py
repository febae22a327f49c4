"""The fine-tuning engine on tiny random models: learning, guards, rollback, atomic saves, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file
from single_thread import one_thread  # noqa: F401  (autouse fixture)

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.events import CheckpointSaved, GuardAlert, RolledBack, RunStarted, StepMetrics
from llmprune.engine.data import random_windows, tokenize
from llmprune.engine.finetune import train
from llmprune.engine.finetune.run_checkpoints import latest_checkpoint
from llmprune.engine.finetune.train import FinetuneConfig, TrainingControl, UnhealthyModelError, finetune_model
from llmprune.engine.io.models import load_model


@pytest.fixture(scope="module")
def token_stream(tiny_tokenizer):
    from pydoc_data.topics import topics

    return tokenize(tiny_tokenizer, "\n\n".join(topics[key] for key in sorted(topics))[:60_000], use_cache=False)


def windows(stream, count=8, seq_len=32, seed=0):
    return random_windows(stream, count, seq_len, seed, "pydoc")


def config(tmp_path, **overrides) -> FinetuneConfig:
    values = dict(out=str(tmp_path / "run"), samples=8, seq_len=32, lr=1e-3, schedule="constant", save_every=100)
    values.update(overrides)
    return FinetuneConfig(**values)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


class NanAtTrainingStep:
    """Makes the k-th training forward pass return NaN logits (armed once training starts)."""

    def __init__(self, model, step: int):
        self.step, self.calls, self.armed = step, 0, False
        model.lm_head.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if self.armed and module.training:
            self.calls += 1
            if self.calls == self.step:
                return output * float("nan")
        return output

    def listener(self, event):
        if isinstance(event, RunStarted):
            self.armed = True


def test_loss_goes_down_on_a_fixed_batch(tmp_path, tiny_tokenizer, token_stream):
    fixed = windows(token_stream, count=1)
    repeated = type(fixed)(fixed.ids.repeat(12, 1), "fixed", fixed.total_tokens_in_source)
    result = finetune_model(
        make_tiny_model(), tiny_tokenizer, config(tmp_path, samples=12, lr=3e-3), train_windows=repeated
    )
    losses = [m["loss"] for m in metrics(result.run_dir)]
    assert result.status == "completed" and result.steps == 12
    assert losses[-1] < 0.7 * losses[0]
    assert all(m["applied"] for m in metrics(result.run_dir))


def test_nan_at_step_k_is_caught_at_k_and_rollback_restores_identical_weights(tmp_path, tiny_tokenizer, token_stream):
    model = make_tiny_model()
    fault = NanAtTrainingStep(model, step=4)
    saved, restored, events = {}, {}, []

    def listener(event):
        fault.listener(event)
        events.append(event)
        if isinstance(event, CheckpointSaved):
            saved[event.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if isinstance(event, RolledBack):
            restored[event.restored_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    result = finetune_model(
        model, tiny_tokenizer, config(tmp_path, save_every=1), listener, train_windows=windows(token_stream)
    )

    alerts = [e for e in events if isinstance(e, GuardAlert)]
    assert [(a.step, a.kind, a.action) for a in alerts] == [(4, "nan_loss", "rollback")]
    # the checkpoint of step 3 was only pending: step 4's NaN came from its weights, so step 2 is the last good one
    rollback = next(e for e in events if isinstance(e, RolledBack))
    assert (rollback.at_step, rollback.restored_step) == (4, 2)
    assert set(restored[2]) == set(saved[2])
    assert all(torch.equal(restored[2][name], saved[2][name]) for name in saved[2])
    lines = metrics(result.run_dir)
    assert lines[3]["step"] == 4 and not lines[3]["applied"] and lines[3]["alerts"][0]["kind"] == "nan_loss"
    assert lines[4]["lr"] == pytest.approx(0.5e-3)  # constant schedule, halved by the rollback
    assert result.status == "completed" and result.rollbacks == 1 and result.steps == 8


def test_tied_embeddings_survive_a_rollback(tmp_path, tiny_tokenizer, token_stream):
    model = make_tiny_model(tie_word_embeddings=True)
    fault = NanAtTrainingStep(model, step=3)
    saved = {}

    def listener(event):
        fault.listener(event)
        if isinstance(event, CheckpointSaved):
            saved[event.step] = model.model.embed_tokens.weight.detach().clone()

    result = finetune_model(
        model,
        tiny_tokenizer,
        config(tmp_path, save_every=1, max_rollbacks=0, on_nan="rollback"),
        listener,
        train_windows=windows(token_stream),
    )
    assert result.status == "stopped_by_guard" and Path(result.last_good_checkpoint).name == "step-000001"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, saved[1])


def test_stop_mode_ends_at_once_and_keeps_the_last_good_weights(tmp_path, tiny_tokenizer, token_stream):
    model = make_tiny_model()
    fault = NanAtTrainingStep(model, step=3)
    result = finetune_model(
        model,
        tiny_tokenizer,
        config(tmp_path, save_every=1, on_nan="stop"),
        fault.listener,
        train_windows=windows(token_stream),
    )
    assert result.status == "stopped_by_guard" and not result.ok and result.steps == 3
    assert Path(result.last_good_checkpoint).name == "step-000001"
    good = load_file(str(Path(result.last_good_checkpoint) / "model.safetensors"))
    reloaded = load_model(result.model_dir).model.state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in good.items())
    assert "lower the learning rate" in result.alerts[0]["advice"][0]


def test_skip_mode_skips_only_the_bad_step(tmp_path, tiny_tokenizer, token_stream):
    model = make_tiny_model()
    fault = NanAtTrainingStep(model, step=2)
    result = finetune_model(
        model, tiny_tokenizer, config(tmp_path, on_nan="skip"), fault.listener, train_windows=windows(token_stream)
    )
    assert [m["applied"] for m in metrics(result.run_dir)] == [True, False, True, True, True, True, True, True]
    assert result.status == "completed" and result.rollbacks == 0


def test_huge_learning_rate_ends_with_a_usable_last_good_checkpoint(tmp_path, tiny_tokenizer, token_stream):
    result = finetune_model(
        make_tiny_model(),
        tiny_tokenizer,
        config(tmp_path, lr=1e3, max_rollbacks=2),
        train_windows=windows(token_stream),
    )
    assert result.status == "stopped_by_guard" and result.rollbacks == 2
    assert latest_checkpoint(Path(result.run_dir, "checkpoints")) == Path(result.last_good_checkpoint)
    reloaded = load_model(result.model_dir)
    ids = windows(token_stream, count=1).ids
    assert torch.isfinite(reloaded.model(input_ids=ids, labels=ids).loss)


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_tokenizer, token_stream, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = []

    def failing_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 3:  # the save of step 4 dies half-way, after writing a partial file
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise OSError("No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    with pytest.raises(UserInputError, match="no space left .* step 4; the checkpoint of step 2 is intact"):
        finetune_model(
            make_tiny_model(), tiny_tokenizer, config(tmp_path, save_every=2), train_windows=windows(token_stream)
        )
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-000002"
    assert not (checkpoints / "step-000004").exists()
    assert not list(checkpoints.glob(".*.partial"))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    resumed = finetune_model(
        make_tiny_model(seed=5),
        tiny_tokenizer,
        config(tmp_path, save_every=2, resume=True),
        train_windows=windows(token_stream),
    )
    assert resumed.status == "completed"
    assert [m["step"] for m in metrics(resumed.run_dir)] == list(range(1, 9))


def test_resume_continues_at_the_right_step_with_the_same_numbers(tmp_path, tiny_tokenizer, token_stream):
    data = windows(token_stream)
    straight = finetune_model(
        make_tiny_model(), tiny_tokenizer, config(tmp_path / "a", schedule="cosine"), train_windows=data
    )

    control = TrainingControl()

    def stop_after_three(event):
        if isinstance(event, StepMetrics) and event.step == 3:
            control.request_stop()

    interrupted = finetune_model(
        make_tiny_model(),
        tiny_tokenizer,
        config(tmp_path / "b", schedule="cosine"),
        stop_after_three,
        control=control,
        train_windows=data,
    )
    assert interrupted.status == "stopped_by_user" and interrupted.steps == 3
    seen = []
    resumed = finetune_model(
        make_tiny_model(seed=9),
        tiny_tokenizer,
        config(tmp_path / "b", schedule="cosine", resume=True),
        seen.append,
        train_windows=data,
    )
    assert next(e for e in seen if isinstance(e, StepMetrics)).step == 4
    assert resumed.steps == 8
    expected = [(m["step"], m["loss"], m["lr"]) for m in metrics(straight.run_dir)]
    got = [(m["step"], m["loss"], m["lr"]) for m in metrics(resumed.run_dir)]
    assert [s for s, _, _ in got] == list(range(1, 9))
    for (_, loss_a, lr_a), (_, loss_b, lr_b) in zip(expected, got, strict=False):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and lr_b == pytest.approx(lr_a)


def test_resume_refuses_other_data_settings_and_missing_runs(tmp_path, tiny_tokenizer, token_stream):
    with pytest.raises(UserInputError, match="no checkpoint"):
        finetune_model(
            make_tiny_model(), tiny_tokenizer, config(tmp_path, resume=True), train_windows=windows(token_stream)
        )
    finetune_model(
        make_tiny_model(), tiny_tokenizer, config(tmp_path, samples=4), train_windows=windows(token_stream, 4)
    )
    with pytest.raises(UserInputError, match="seq_len"):
        finetune_model(make_tiny_model(), tiny_tokenizer, config(tmp_path, samples=4, seq_len=16, resume=True))
    with pytest.raises(UserInputError, match="already holds a run"):
        finetune_model(
            make_tiny_model(), tiny_tokenizer, config(tmp_path, samples=4), train_windows=windows(token_stream, 4)
        )


def test_unhealthy_model_is_refused_unless_forced(tmp_path, tiny_tokenizer, token_stream):
    model = make_tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UnhealthyModelError) as refused:
        finetune_model(model, tiny_tokenizer, config(tmp_path), train_windows=windows(token_stream))
    assert not refused.value.report.ok
    assert any(f.check == "nan" for f in refused.value.report.findings)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None
    forced = finetune_model(model, tiny_tokenizer, config(tmp_path, force=True), train_windows=windows(token_stream))
    # NaN weights give a NaN loss at once; with no state proved good there is nothing to roll back to
    assert forced.status == "stopped_by_guard" and forced.steps == 1 and forced.rollbacks == 0
    assert forced.model_dir is None and "no state was proved good" in forced.message


def test_a_failing_listener_does_not_stop_training(tmp_path, tiny_tokenizer, token_stream):
    def broken(event):
        raise RuntimeError("the UI crashed")

    result = finetune_model(
        make_tiny_model(), tiny_tokenizer, config(tmp_path), broken, train_windows=windows(token_stream)
    )
    assert result.status == "completed" and result.steps == 8


def test_lora_merged_and_adapter_outputs(tmp_path, tiny_tokenizer, token_stream):
    base = make_tiny_model()
    n_base = sum(p.numel() for p in base.parameters())
    merged = finetune_model(
        base,
        tiny_tokenizer,
        config(tmp_path / "m", method="lora", lora_r=4, merge=True),
        train_windows=windows(token_stream),
    )
    reloaded = load_model(merged.model_dir).model
    assert sum(p.numel() for p in reloaded.parameters()) == n_base
    adapter = finetune_model(
        make_tiny_model(),
        tiny_tokenizer,
        config(tmp_path / "a", method="lora", lora_r=4),
        train_windows=windows(token_stream),
    )
    assert adapter.model_dir is None and Path(adapter.adapter_dir, "adapter_model.safetensors").is_file()


def test_pruned_non_uniform_model_keeps_its_shapes(tmp_path, tiny_tokenizer, token_stream):
    from llmprune.engine.io.architecture import apply_layer_shapes, layer_shapes

    model = make_tiny_model()
    shapes = [shape.to_dict() for shape in layer_shapes(model)]
    shapes[1].update(num_attention_heads=4, num_key_value_heads=1, intermediate_size=96)
    apply_layer_shapes(model, shapes)
    result = finetune_model(model, tiny_tokenizer, config(tmp_path), train_windows=windows(token_stream))
    reloaded = load_model(result.model_dir).model
    assert [s.to_dict() for s in layer_shapes(reloaded)] == shapes


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "qlora"}, "--method"),
        ({"on_nan": "ignore"}, "--on-nan"),
        ({"lr": -1.0}, "--lr"),
        ({"samples": 0}, "--samples"),
        ({"merge": True}, "--merge"),
        ({"resume": True, "out": None}, "--resume"),
    ],
)
def test_bad_settings_are_user_errors(overrides, message):
    with pytest.raises(UserInputError, match=message):
        FinetuneConfig(**overrides).validate()


def test_too_few_samples_for_one_step_is_a_user_error(tmp_path, tiny_tokenizer, token_stream):
    with pytest.raises(UserInputError, match="fewer than one optimizer step"):
        finetune_model(
            make_tiny_model(),
            tiny_tokenizer,
            config(tmp_path, samples=2, batch_size=2, grad_accum=2),
            train_windows=windows(token_stream, 2),
        )


def test_grad_accumulation_steps_count_optimizer_steps(tmp_path, tiny_tokenizer, token_stream):
    result = finetune_model(
        make_tiny_model(),
        tiny_tokenizer,
        config(tmp_path, batch_size=2, grad_accum=2, epochs=2),
        train_windows=windows(token_stream),
    )
    assert result.total_steps == 4 and [m["epoch"] for m in metrics(result.run_dir)] == [1, 1, 2, 2]


def test_training_module_has_no_ui_imports():
    source = Path(train.__file__).read_text()
    assert not any(name in source for name in ("import typer", "import rich", "from rich", "textual"))


def test_a_loss_back_at_chance_level_is_a_collapse():
    from llmprune.engine.finetune.guards import check_step

    assert check_step(3.2, 1.0, 1e6, collapse_loss=10.26).ok
    verdict = check_step(10.80, 0.0, 1e6, collapse_loss=10.26)  # SmolLM2 after one step at lr 1e3: uniform output
    assert not verdict.ok and verdict.kind == "collapsed"
    assert check_step(10.80, 1.0, 1e6).ok  # not armed: a random model starts at chance level


def test_an_exactly_zero_gradient_is_a_collapse_even_before_the_model_beat_chance():
    from llmprune.engine.finetune.guards import check_step

    verdict = check_step(5.95, 0.0, 1e6)  # a tiny random model after one step at lr 1e3
    assert not verdict.ok and verdict.kind == "dead_gradient"
    assert check_step(5.95, 1e-9, 1e6).ok


def test_a_step_refused_on_another_process_is_refused_here_too():
    from llmprune.engine.finetune.guards import StepVerdict
    from llmprune.engine.finetune.step import all_processes_agree

    class TwoProcesses:  # the other process refused: the all-reduced "refused" flag sums to 1
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, others_refused: float):
            self.others = others_refused

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + self.others

    agreed = all_processes_agree(StepVerdict(True), TwoProcesses(1.0))
    assert not agreed.ok and agreed.kind == "other_process"
    assert all_processes_agree(StepVerdict(True), TwoProcesses(0.0)).ok
    refused = StepVerdict(False, "nan_loss", float("nan"), "loss is NaN")
    assert all_processes_agree(refused, TwoProcesses(0.0)) is refused  # its own reason is kept
