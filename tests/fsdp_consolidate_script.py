"""Run by tests/e2e/test_train_distributed.py under torchrun with two CPU processes (gloo): torch's FSDP2
(`fully_shard`) trains a tiny pruned model one step and saves its sharded state the way accelerate's
save_state does with SHARDED_STATE_DICT (torch.distributed.checkpoint into pytorch_model_fsdp_0/); process 0
also writes the gathered full state dict, the reference the consolidated model must equal."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_tokenizer  # noqa: E402
from unit.test_memory_plan import pruned_model  # noqa: E402

from llmprune.engine.io.checkpoint import save_model  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model = pruned_model()
if rank == 0:
    save_model(model, make_tiny_tokenizer(), out / "start")  # the model the run started from
dist.barrier()
model.train()
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids = torch.randint(3, 384, (1, 32), generator=torch.Generator().manual_seed(rank))
model(input_ids=ids, labels=ids).loss.backward()
optimizer.step()
assert type(model.model.layers[1].mlp.down_proj.weight).__name__ == "DTensor"  # really sharded
dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / "checkpoint" / "pytorch_model_fsdp_0"))
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save(full, out / "full.pt")
dist.barrier()
dist.destroy_process_group()
