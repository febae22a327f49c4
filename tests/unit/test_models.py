import pytest
import torch
from safetensors.torch import save_file

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.models import load_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 33, 200, 17, 4, 8]])


def test_hf_directory_loads_with_tokenizer(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.kind == "directory"
    assert loaded.tokenizer is not None
    assert loaded.model.config.num_key_value_heads == 2


def test_state_dict_bin_with_base_model(tiny_model_dir, tmp_path):
    reference = load_model(str(tiny_model_dir)).model
    path = tmp_path / "weights.bin"
    torch.save(reference.state_dict(), path)
    loaded = load_model(str(path), base_model=str(tiny_model_dir))
    assert loaded.kind == "state_dict"
    assert torch.equal(_logits(loaded.model, IDS), _logits(reference, IDS))


def test_safetensors_file_uses_config_beside_it(tiny_model_dir, tmp_path):
    reference = load_model(str(tiny_model_dir)).model
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    path = tmp_path / "model-only.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = load_model(str(path))
    assert torch.equal(_logits(loaded.model, IDS), _logits(reference, IDS))


def test_pruned_state_dict_shapes_are_read_from_tensors(tiny_model_dir, tmp_path):
    """A state dict with fewer heads/channels in one layer still loads on the base config."""
    state = load_model(str(tiny_model_dir)).model.state_dict()
    head_dim = 8
    keep_q, keep_kv = 4 * head_dim, 1 * head_dim  # one KV group of 4 query heads
    prefix = "model.layers.1."
    state[prefix + "self_attn.q_proj.weight"] = state[prefix + "self_attn.q_proj.weight"][:keep_q].clone()
    state[prefix + "self_attn.k_proj.weight"] = state[prefix + "self_attn.k_proj.weight"][:keep_kv].clone()
    state[prefix + "self_attn.v_proj.weight"] = state[prefix + "self_attn.v_proj.weight"][:keep_kv].clone()
    state[prefix + "self_attn.o_proj.weight"] = state[prefix + "self_attn.o_proj.weight"][:, :keep_q].clone()
    for name in ("gate_proj", "up_proj"):
        state[prefix + f"mlp.{name}.weight"] = state[prefix + f"mlp.{name}.weight"][:96].clone()
    state[prefix + "mlp.down_proj.weight"] = state[prefix + "mlp.down_proj.weight"][:, :96].clone()
    path = tmp_path / "pruned.pt"
    torch.save(state, path)
    loaded = load_model(str(path), base_model=str(tiny_model_dir))
    layer = loaded.model.model.layers[1]
    assert layer.self_attn.q_proj.out_features == keep_q
    assert layer.self_attn.num_key_value_groups == 4
    assert layer.mlp.down_proj.in_features == 96
    assert torch.isfinite(_logits(loaded.model, IDS)).all()


def test_state_dict_that_does_not_fit_is_user_error(tiny_model_dir, tmp_path):
    state = load_model(str(tiny_model_dir)).model.state_dict()
    state["model.embed_tokens.weight"] = torch.zeros(10, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(UserInputError, match="do not fit"):
        load_model(str(path), base_model=str(tiny_model_dir))


def test_weights_only_file_without_config_asks_for_base_model(tiny_model_dir, tmp_path):
    path = tmp_path / "w.bin"
    torch.save(load_model(str(tiny_model_dir)).model.state_dict(), path)
    with pytest.raises(UserInputError, match="--base-model"):
        load_model(str(path))


class _Blob:  # a class outside torch's allow-list, like a pickled module
    pass


def test_pickled_module_needs_trust_pickle(tiny_model_dir, tmp_path):
    reference = load_model(str(tiny_model_dir))
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": reference.model, "tokenizer": reference.tokenizer}, path)
    with pytest.raises(UserInputError, match="--trust-pickle"):
        load_model(str(path), base_model=str(tiny_model_dir))
    loaded = load_model(str(path), base_model=str(tiny_model_dir), trust_pickle=True)
    assert loaded.kind == "pickle"
    assert torch.equal(_logits(loaded.model, IDS), _logits(reference.model, IDS))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nothing-like-this", "unknown model"),
        ("./missing/model.gguf", "does not exist"),
        ("", "no model given"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(UserInputError, match=message):
        load_model(spec)


def test_folder_without_config_is_user_error(tmp_path):
    with pytest.raises(UserInputError, match="no config.json"):
        load_model(str(tmp_path))


def test_empty_and_truncated_files_are_user_errors(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(UserInputError, match="empty"):
        load_model(str(empty), base_model=str(tiny_model_dir))
    truncated = tmp_path / "t.safetensors"
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="safetensors"):
        load_model(str(truncated), base_model=str(tiny_model_dir))


def test_offline_hub_id_fails_fast_with_one_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="cannot be reached"):
        load_model("some-org/some-model-that-is-not-cached")


def test_non_llama_model_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match="Llama-style"):
        load_model(str(tmp_path))
