"""Run by tests/test_train_distributed.py under torchrun with two CPU processes (gloo)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model, make_tiny_tokenizer  # noqa: E402

from llmprune.engine.data import random_windows, tokenize  # noqa: E402
from llmprune.engine.finetune.train import FinetuneConfig, finetune_model  # noqa: E402

out = Path(sys.argv[1])
resume = len(sys.argv) > 2 and sys.argv[2] == "resume"
nan_on_rank1 = len(sys.argv) > 2 and sys.argv[2] == "nan-on-rank1"
torch.set_num_threads(1)
tokenizer = make_tiny_tokenizer()
stream = tokenize(tokenizer, Path(sys.argv[1]).with_suffix(".txt").read_text(), use_cache=False)
windows = random_windows(stream, 8, 32, 0, "pydoc")
config = FinetuneConfig(out=str(out), samples=8, seq_len=32, lr=1e-3, save_every=2, resume=resume)
model = make_tiny_model()
rank = int(__import__("os").environ.get("RANK", "0"))
if nan_on_rank1 and rank == 1:  # the third forward pass of process 1 only (the health check's included) turns NaN
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            return (output[0] * float("nan"), *output[1:]) if isinstance(output, tuple) else output * float("nan")
        return output

    model.model.layers[0].register_forward_hook(poison)
control = None
if len(sys.argv) > 2 and sys.argv[2] == "requests-on-one-rank":
    from llmprune.engine.finetune.train import TrainingControl

    control = TrainingControl()
    if rank == 0:
        control.request_save()  # the dashboard's `s`: only the first process has a dashboard
    else:
        control.request_stop()  # a signal that reached process 1 only
result = finetune_model(model, tokenizer, config, train_windows=windows, control=control)
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
(out.parent / f"rank{rank}.json").write_text(json.dumps({"world": world, **result.to_dict()}))
