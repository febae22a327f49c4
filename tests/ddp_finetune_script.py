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
torch.set_num_threads(1)
tokenizer = make_tiny_tokenizer()
stream = tokenize(tokenizer, Path(sys.argv[1]).with_suffix(".txt").read_text(), use_cache=False)
windows = random_windows(stream, 8, 32, 0, "pydoc")
config = FinetuneConfig(out=str(out), samples=8, seq_len=32, lr=1e-3, save_every=2, resume=resume)
result = finetune_model(make_tiny_model(), tokenizer, config, train_windows=windows)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
(out.parent / f"rank{rank}.json").write_text(json.dumps({"world": world, **result.to_dict()}))
