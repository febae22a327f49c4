import math

import torch

from llmprune.engine.data import TokenWindows
from llmprune.engine.evaluate import perplexity


def _windows(n=6, seq_len=32, vocab=384, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TokenWindows(torch.randint(0, vocab, (n, seq_len), generator=generator), "random", n * seq_len)


def test_perplexity_matches_transformers_loss(tiny_model):
    windows = _windows()
    result = perplexity(tiny_model, windows, batch_size=1)
    # independent reference: transformers' own shifted loss, averaged over equal-length windows
    with torch.no_grad():
        losses = [tiny_model(input_ids=w[None], labels=w[None]).loss.item() for w in windows.ids]
    assert math.isclose(result.ppl, math.exp(sum(losses) / len(losses)), rel_tol=1e-5)
    assert result.tokens == 6 * 31


def test_batch_size_does_not_change_perplexity(tiny_model):
    windows = _windows(n=7)
    one = perplexity(tiny_model, windows, batch_size=1).ppl
    three = perplexity(tiny_model, windows, batch_size=3).ppl
    assert math.isclose(one, three, rel_tol=1e-5)


def test_nan_weights_give_infinite_or_nan_perplexity(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    result = perplexity(tiny_model, _windows(n=2), batch_size=1)
    assert not math.isfinite(result.ppl)
    assert result.nonfinite_windows == 2
