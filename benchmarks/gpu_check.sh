#!/usr/bin/env bash
# One check a GPU machine runs as is (under 8 minutes on one GPU): SmolLM2 eval, prune, a 50-step full
# fine-tune and a LoRA fine-tune in bf16 on CUDA, a short FSDP fine-tune over all GPUs when there are two or
# more (accelerate/fsdp.yaml), the Llama-3-8B-shaped streamed prune to 6.5 B on the GPU (its refit drawing
# ~1,570 windows of 64 tokens, 8 per kept input of down_proj, which the CPU does not) and the memory plan
# of fine-tuning that pruned model on this device (finetune --dry-run: full, full + gradient checkpointing,
# LoRA), each step's wall time and peak memory written to one JSON (benchmarks/results/gpu_check_<device>.json).
#
#   benchmarks/gpu_check.sh                 # CUDA, bf16, full sizes
#   benchmarks/gpu_check.sh --device cpu    # the same steps on the CPU, smaller sizes (fp32)
#
# Needs `make install` (on CUDA: make install TORCH_SPEC="torch==... --index-url <CUDA index>") and the
# shared text (../shared/data, or LLMPRUNE_SHARED_DATA). The 8B-shaped checkpoint is built into
# $LLMPRUNE_BIG_DIR (default /tmp/llmprune-big; 16 GB for 32 layers) unless it is there already.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" benchmarks/gpu_check.py "$@"
