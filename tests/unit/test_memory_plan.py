"""The memory plan (before anything loads) and gradient checkpointing (same loss and gradients, less memory)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_config, make_tiny_model
from single_thread import one_thread  # noqa: F401  (autouse fixture)

from llmprune.engine.finetune.config import DEFAULT_LORA_TARGETS, FinetuneConfig
from llmprune.engine.finetune.memory_plan import PlanSettings, describe_misfit, plan_memory, shape_from_config
from llmprune.engine.finetune.run_setup import apply_lora, enable_gradient_checkpointing

GIB = 2**30
PRUNED_SHAPES = [
    {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128},
    {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 96},
    {"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 64},
    {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128},
]


def pruned_model(seed: int = 0):
    """A tiny pruned model of llmprune's own class (remote code: per-layer heads and MLP widths)."""
    from llmprune.engine.io.remote_code.modeling_llmprune import LlmpruneLlamaForCausalLM

    torch.manual_seed(seed)
    model = LlmpruneLlamaForCausalLM(make_tiny_config(layer_shapes=PRUNED_SHAPES))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    return model


@pytest.mark.parametrize("make", [make_tiny_model, pruned_model], ids=["stock", "pruned"])
def test_the_shape_read_from_the_config_counts_what_the_model_holds(make):
    model = make()
    shape = shape_from_config(model.config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert [w.intermediate for w in shape.layers] == [m.mlp.gate_proj.out_features for m in model.model.layers]
    lora = apply_lora(copy.deepcopy(model), FinetuneConfig(method="lora", lora_r=4))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape.lora_parameters(DEFAULT_LORA_TARGETS, 4) == adapters


def test_each_option_moves_the_term_it_should():
    shape = shape_from_config(make_tiny_config(layers=8, hidden=256, intermediate=1024, vocab=4096, heads=8))
    full = plan_memory(shape, PlanSettings(batch_size=4, seq_len=512, lora_targets=DEFAULT_LORA_TARGETS))
    assert full.terms["optimizer (AdamW)"] == 8 * shape.parameters and full.terms["gradients"] == 4 * shape.parameters
    lora = plan_memory(shape, replace(full.settings, method="lora"))
    assert lora.terms["optimizer (AdamW)"] < full.terms["optimizer (AdamW)"] / 10
    checkpointed = plan_memory(shape, replace(full.settings, gradient_checkpointing=True))
    assert checkpointed.terms["activations"] < full.terms["activations"] / 3
    assert checkpointed.terms["weights"] == full.terms["weights"]
    halved = plan_memory(shape, replace(full.settings, batch_size=2))
    assert halved.terms["activations"] * 2 == full.terms["activations"]
    sharded = plan_memory(shape, replace(full.settings, device="cuda", bf16=True, processes=4, sharded=True))
    assert sharded.terms["optimizer (AdamW)"] == full.terms["optimizer (AdamW)"] // 4
    teacher = plan_memory(shape, full.settings, teacher=shape)
    assert teacher.terms["teacher"] > full.terms["weights"]


def test_a_plan_that_does_not_fit_names_the_biggest_term_and_fixes_that_fit():
    shape = shape_from_config(make_tiny_config(layers=8, hidden=256, intermediate=1024, vocab=4096, heads=8))
    settings = PlanSettings(batch_size=16, seq_len=1024, lora_targets=DEFAULT_LORA_TARGETS)
    roomy = plan_memory(shape, settings)
    tight = plan_memory(shape, settings, available_bytes=roomy.needed_bytes // 2)
    assert not tight.fits and tight.biggest_term == "activations"
    assert tight.fixes and all(fix["needed_bytes"] <= tight.available_bytes for fix in tight.fixes)
    assert tight.fixes[0]["change"].startswith("--gradient-checkpointing")
    problem, hint = describe_misfit(tight)
    assert "activations" in problem and "--gradient-checkpointing" in hint and "--force" in hint
    assert plan_memory(shape, settings, available_bytes=roomy.needed_bytes).fits


def test_an_8b_shaped_full_fine_tune_needs_sharding_on_80_gb():
    # Llama-3-8B widths pruned to about 6.5 B: 32 layers, 4096 hidden, 12288 MLP, 128k vocabulary
    config = make_tiny_config(
        layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=11008, vocab=128256, tie_word_embeddings=False
    )
    shape = shape_from_config(config)
    assert 6.0e9 < shape.parameters < 7.0e9
    gpu = PlanSettings(batch_size=1, seq_len=2048, device="cuda", bf16=True, lora_targets=DEFAULT_LORA_TARGETS)
    plan = plan_memory(shape, gpu, available_bytes=80 * 10**9)
    assert not plan.fits and plan.needed_bytes > 100 * GIB
    assert any("FSDP" in fix["change"] for fix in plan.fixes) or any("lora" in fix["change"] for fix in plan.fixes)
    assert plan_memory(shape, replace(gpu, processes=2, sharded=True), available_bytes=80 * 10**9).fits


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("make", [make_tiny_model, pruned_model], ids=["stock", "pruned"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make, method):
    ids = torch.randint(3, 384, (2, 32), generator=torch.Generator().manual_seed(1))
    runs = []
    for checkpointing in (False, True):
        model = make()
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_gradient_checkpointing
        if method == "lora":
            model = apply_lora(model, FinetuneConfig(method="lora", lora_r=4))
        model.train()
        torch.manual_seed(0)  # the same LoRA dropout masks in both runs (the recompute restores the RNG state)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.detach(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = runs
    assert torch.allclose(loss, loss_ckpt, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6), name


def test_a_model_without_gradient_checkpointing_says_so():
    from llmprune.engine.core.errors import UserInputError

    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(UserInputError, match="cannot do gradient checkpointing"):
        enable_gradient_checkpointing(Plain())


@pytest.mark.parametrize(("world", "says"), [("1", "single process"), ("2", "GPUs only")])
def test_fsdp_asked_for_where_it_cannot_shard_says_how_to_launch(tiny_model_dir, monkeypatch, world, says):
    from llmprune.engine.core.errors import UserInputError
    from llmprune.engine.finetune.memory_plan import plan_finetune

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(UserInputError, match=says) as raised:
        plan_finetune(FinetuneConfig(model=str(tiny_model_dir), device="cpu"))
    assert "accelerate launch" in raised.value.hint
