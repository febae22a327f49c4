"""GGUF export: every tensor, shape and metadata key read back with gguf.GGUFReader against the source model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from typer.testing import CliRunner

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.checkpoint import save_model
from llmprune.engine.io.gguf_export import ExportConfig, export_gguf, llama3_rope_factors
from llmprune.engine.io.gguf_tensors import layer_dims, permute
from llmprune.engine.io.tensor_store import StateDictStore
from llmprune.engine.pruning.cut.surgery import prune_kv_groups, prune_mlp_channels

gguf = pytest.importorskip("gguf")

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(reader) -> dict[str, np.ndarray]:
    """name -> values in PyTorch order (GGUF lists dimensions innermost first)."""
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = np.asarray(values, dtype=np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))
    return out


def _expected(model) -> dict[str, torch.Tensor]:
    """What the file must hold: llama.cpp names, q/k rows permuted for its rope, nothing for tied or zero tensors."""
    config = model.config
    expected = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    if not config.tie_word_embeddings:
        expected["output.weight"] = model.lm_head.weight
    for index, layer in enumerate(model.model.layers):
        for name, tensor in layer.state_dict().items():
            if name.endswith("bias") and not tensor.any():
                continue
            if name == "self_attn.q_proj.weight":
                tensor = permute(tensor, tensor.shape[0] // config.head_dim)
            if name == "self_attn.k_proj.weight":
                tensor = permute(tensor, tensor.shape[0] // config.head_dim)
            expected[f"blk.{index}.{_NAMES[name]}"] = tensor
    return {name: tensor.detach().float() for name, tensor in expected.items()}


def _check_tensors(path, model, atol=0.0):
    reader = gguf.GGUFReader(str(path))
    written = _tensors(reader)
    expected = _expected(model)
    assert set(written) - {"rope_freqs.weight"} == set(expected)
    for name, tensor in expected.items():
        assert written[name].shape == tuple(tensor.shape), name
        np.testing.assert_allclose(written[name], tensor.numpy(), atol=atol, rtol=0, err_msg=name)
    return reader


def test_dense_model_exports_as_llama_with_every_tensor_and_key(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export_gguf(ExportConfig(str(tiny_model_dir), str(tmp_path / "dense.gguf"), "f32"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    reader = _check_tensors(tmp_path / "dense.gguf", model)
    fields = _fields(reader)
    assert result.architecture == "llama" and fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 4 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 8 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.rope.dimension_count"] == 8
    assert fields["llama.vocab_size"] == 384 and fields["general.file_type"] == 0
    vocab = tiny_tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds nothing, so llama.cpp must not either
    assert len(fields["tokenizer.ggml.merges"]) == len(
        json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    )


def test_non_uniform_pruned_model_exports_as_deci_with_per_layer_shapes(tiny_tokenizer, tmp_path):
    model = make_tiny_model()
    prune_kv_groups(model.model.layers[1], [1])  # 8:2 -> 4:1
    prune_mlp_channels(model.model.layers[2], list(range(0, 128, 2)))  # 128 -> 64
    layer0 = model.model.layers[0]
    layer0.self_attn.o_proj.bias = torch.nn.Parameter(torch.linspace(-1, 1, 64))  # as compensation writes it
    layer0.mlp.down_proj.bias = torch.nn.Parameter(torch.linspace(1, -1, 64))
    save_model(model, tiny_tokenizer, tmp_path / "pruned")

    result = export_gguf(ExportConfig(str(tmp_path / "pruned"), str(tmp_path / "pruned.gguf"), "f32"))
    reader = _check_tensors(tmp_path / "pruned.gguf", model)
    fields = _fields(reader)
    assert result.architecture == "deci" and fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [8, 4, 8, 8]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 2, 2]
    assert fields["deci.feed_forward_length"] == [128, 128, 64, 128]
    assert fields["deci.attention.key_length"] == 8 == fields["deci.attention.value_length"]
    assert "blk.0.attn_output.bias" in {t.name for t in reader.tensors}


def test_llama3_details_untied_head_rope_freqs_head_dim_128_vocab_128256(tiny_tokenizer, tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = make_tiny_model(
        layers=2, heads=1, kv_heads=1, hidden=128, intermediate=64, vocab=128256, rope_parameters=rope
    )
    model.config.head_dim = 128
    save_model(model, tiny_tokenizer, tmp_path / "llama3")

    result = export_gguf(ExportConfig(str(tmp_path / "llama3"), str(tmp_path / "llama3.gguf"), "f16"))
    reader = gguf.GGUFReader(str(tmp_path / "llama3.gguf"))
    fields = _fields(reader)
    tensors = _tensors(reader)
    assert result.architecture == "llama"
    assert fields["llama.rope.dimension_count"] == 128 and fields["llama.attention.key_length"] == 128
    assert fields["llama.vocab_size"] == 128256 and len(fields["tokenizer.ggml.tokens"]) == 128256
    assert fields["tokenizer.ggml.tokens"][-1] == "[PAD128255]"
    assert fields["llama.rope.freq_base"] == 500000.0
    assert tensors["output.weight"].shape == (128256, 128)  # untied: its own head
    assert not np.allclose(tensors["output.weight"], tensors["token_embd.weight"])
    np.testing.assert_allclose(tensors["rope_freqs.weight"], llama3_rope_factors(500000.0, 128, rope).numpy())
    assert tensors["rope_freqs.weight"].shape == (64,) and tensors["rope_freqs.weight"].max() == 8.0
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert (
        types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
        and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    )
    np.testing.assert_allclose(
        tensors["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy(), atol=1e-3
    )


def test_q8_0_keeps_rows_not_a_multiple_of_32_in_f16(tiny_tokenizer, tmp_path):
    model = make_tiny_model()
    prune_mlp_channels(model.model.layers[0], list(range(100)))  # down_proj rows of 100 values
    save_model(model, tiny_tokenizer, tmp_path / "odd")
    result = export_gguf(ExportConfig(str(tmp_path / "odd"), str(tmp_path / "odd.gguf"), "q8_0"))
    assert result.f16_fallbacks == ["blk.0.ffn_down.weight"]
    reader = _check_tensors(tmp_path / "odd.gguf", model, atol=0.01)  # q8_0 keeps values within a block's scale / 127
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert (
        types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
        and types["blk.0.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32
    )


def test_layers_without_heads_or_channels_get_one_zero_head():
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(0, 16),
        "model.layers.0.self_attn.k_proj.weight": torch.zeros(0, 16),
        "model.layers.0.mlp.gate_proj.weight": torch.zeros(0, 16),
    }
    dims, padded = layer_dims(StateDictStore(state), 1, head_dim=4)
    assert padded == [0] and (dims[0].heads, dims[0].kv_heads, dims[0].ffn) == (1, 1, 1)


def test_export_refuses_bad_outtype_and_leaves_no_file(tiny_model_dir, tmp_path):
    with pytest.raises(UserInputError, match="--outtype"):
        export_gguf(ExportConfig(str(tiny_model_dir), str(tmp_path / "x.gguf"), "q4_k"))
    assert not list(tmp_path.iterdir())


def test_cli_export_json_and_bad_input(tiny_model_dir, tmp_path):
    from llmprune.cli.app import app

    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    result = runner.invoke(app, ["export", str(tiny_model_dir), "--gguf", str(out), "--outtype", "f16", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["architecture"] == "llama" and payload["path"] == str(out) and out.is_file()
    bad = runner.invoke(app, ["export", str(tiny_model_dir), "--gguf", str(tmp_path / "x.bin")])
    assert bad.exit_code == 2 and ".gguf" in bad.output


def test_recipe_export_gguf_writes_the_final_model_as_the_last_step(tiny_model_dir, pydoc_text_file, tmp_path):
    from llmprune.cli.app import app

    args = [
        "recipe",
        "safe",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(pydoc_text_file),
        "--eval-dataset",
        str(pydoc_text_file),
        "--out",
        str(tmp_path),
        "--ratio",
        "0.3",
        "--seq-len",
        "32",
        "--calibration-samples",
        "4",
        "--eval-windows",
        "4",
        "--batch-size",
        "4",
        "--skip-finetune",
        "--export",
        "gguf",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / f"{tiny_model_dir.name}-safe-30"
    state = json.loads((run_dir / "state.json").read_text())
    exported = state["steps"]["export"]["result"]
    assert exported["gguf"] == str(run_dir / "model.gguf")
    reader = gguf.GGUFReader(str(run_dir / "model.gguf"))
    pruned_heads = json.loads((run_dir / "pruned" / "llmprune.json").read_text())["layer_shapes"]
    arch = _fields(reader)["general.architecture"]
    heads = _fields(reader)[f"{arch}.attention.head_count"]
    assert (heads if isinstance(heads, list) else [heads] * 4) == [
        shape["num_attention_heads"] for shape in pruned_heads
    ]
    bad = CliRunner().invoke(app, [*args[:-3], "--export", "onnx"])
    assert bad.exit_code == 2 and "--export" in bad.output
