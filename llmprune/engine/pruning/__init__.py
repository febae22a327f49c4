"""Structured pruning: importance scores, per-layer allocation, surgery on the real
transformers modules, compensation of the removed units, the pipeline."""
