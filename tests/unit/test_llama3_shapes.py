"""Llama-3-8B's shapes in small: head_dim 128, GQA 4:1, bf16 sharded safetensors with an index.

The streamed paths (eval, prune, doctor's forward test) give what the in-memory
paths give, and every saved model keeps the source's dtype unless asked otherwise.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmprune.engine.evaluate import EvalConfig, run_evaluation
from llmprune.engine.io.models import load_model
from llmprune.engine.io.safetensors_copy import stored_dtype_names
from llmprune.engine.pruning.analysis import CalibrationOptions
from llmprune.engine.pruning.pipeline import PruneConfig, run_prune


def _dtypes(directory) -> set[str]:
    return {dtype for path in directory.glob("*.safetensors") for dtype in stored_dtype_names(path).values()}


@pytest.fixture(scope="module")
def llama3_like_dir(tmp_path_factory, tiny_tokenizer):
    """3 layers, hidden 256, 8 query heads of 128 over 2 KV heads (4:1), untied head, rope θ 500,000; bf16, 3 shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=384,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        rope_theta=500000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.05)
    directory = tmp_path_factory.mktemp("llama3-like")
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="1MB")
    tiny_tokenizer.save_pretrained(directory)
    assert (directory / "model.safetensors.index.json").is_file() and _dtypes(directory) == {"BF16"}
    return directory


def test_streamed_eval_equals_in_memory_eval(llama3_like_dir, pydoc_text_file):
    common = dict(
        model=str(llama3_like_dir), dataset=str(pydoc_text_file), seq_len=48, max_windows=5, batch_size=2, device="cpu"
    )
    in_memory = run_evaluation(EvalConfig(**common, stream=False))
    streamed = run_evaluation(EvalConfig(**common, stream=True))
    assert streamed.windows == in_memory.windows == 5 and streamed.params == in_memory.params
    assert streamed.ppl == pytest.approx(in_memory.ppl, rel=1e-5)
    assert "streamed" in streamed.device


def _prune(directory, out, stream: bool, text, **extra):
    config = PruneConfig(
        model=str(directory),
        target_params="0.8",
        stream=stream,
        out=out,
        device="cpu",
        log_dir=out.parent / "logs",
        # the refit's own windows asked for: streamed on the CPU it would not draw them by itself
        calibration=CalibrationOptions(dataset=str(text), samples=8, refit_samples=12, seq_len=32),
        **extra,
    )
    return run_prune(config)


def test_streamed_prune_equals_in_memory_prune_and_keeps_bf16(llama3_like_dir, pydoc_text_file, tmp_path):
    streamed = _prune(llama3_like_dir, tmp_path / "s", True, pydoc_text_file)
    in_memory = _prune(llama3_like_dir, tmp_path / "m", False, pydoc_text_file)
    assert streamed.params_after == in_memory.params_after < 0.81 * in_memory.params_before
    assert [c.after for c in streamed.layers] == [c.after for c in in_memory.layers]
    assert streamed.gqa_summary() == "all layers keep 4:1"
    # bf16 in -> bf16 out, both ways, and config.json says so
    for out in (tmp_path / "s", tmp_path / "m"):
        assert _dtypes(out) == {"BF16"}
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = load_model(str(tmp_path / "s")).model, load_model(str(tmp_path / "m")).model
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-5)
    # what held the memory is reported phase by phase (the figures: benchmarks/phase_peaks.py)
    assert {"load", "measure", "prune", "save"} <= set(streamed.peak_rss_by_phase)


@pytest.mark.parametrize("stream", [True, False])
def test_save_dtype_chooses_another_dtype(llama3_like_dir, pydoc_text_file, tmp_path, stream):
    _prune(llama3_like_dir, tmp_path / "out", stream, pydoc_text_file, save_dtype="float32")
    assert _dtypes(tmp_path / "out") == {"F32"}
    assert load_model(str(tmp_path / "out")).source_dtype == torch.float32


def test_streamed_forward_test_equals_the_in_memory_one(llama3_like_dir):
    from llmprune.engine.diagnose.doctor import DoctorConfig, run_doctor

    streamed = run_doctor(
        DoctorConfig(model=str(llama3_like_dir), test_forward=True, stream=True, device="cpu")
    ).forward
    in_memory = run_doctor(
        DoctorConfig(model=str(llama3_like_dir), test_forward=True, stream=False, device="cpu")
    ).forward
    assert streamed.ok and in_memory.ok
    assert streamed.output_shape == in_memory.output_shape
    assert streamed.logits_max == pytest.approx(in_memory.logits_max, rel=1e-5)
    assert streamed.logits_min == pytest.approx(in_memory.logits_min, rel=1e-5)
