"""End to end on the real SmolLM2-135M (the embedded default model), a few windows only."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from llmprune.cli.app import app

pytestmark = pytest.mark.slow


def test_alias_loads_a_plain_saveable_llama(smollm2):
    model = smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert 134e6 < smollm2.num_parameters < 135e6


def test_eval_cli_matches_a_plain_transformers_loop(smollm2, wikitext_test):
    from llmprune.engine.data import load_evaluation_windows

    result = runner_json(
        ["eval", "smollm2-135m", "--dataset", str(wikitext_test), "--seq-len", "128", "--max-windows", "8"]
    )
    windows = load_evaluation_windows(smollm2.tokenizer, str(wikitext_test), 128, 8)
    with torch.no_grad():
        losses = [smollm2.model(input_ids=w[None], labels=w[None]).loss.item() for w in windows.ids]
    reference = math.exp(sum(losses) / len(losses))
    assert math.isclose(result["ppl"], reference, rel_tol=1e-4)
    assert 10 < result["ppl"] < 200  # an intact small model on Wikipedia text


def runner_json(args):
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_streamed_eval_equals_in_memory_eval_on_smollm2(wikitext_test):
    from llmprune.engine.evaluate import EvalConfig, run_evaluation

    common = dict(
        model="smollm2-135m", dataset=str(wikitext_test), seq_len=256, max_windows=4, batch_size=2, device="cpu"
    )
    in_memory = run_evaluation(EvalConfig(**common, stream=False))
    streamed = run_evaluation(EvalConfig(**common, stream=True))
    assert streamed.ppl == pytest.approx(in_memory.ppl, rel=1e-5)
