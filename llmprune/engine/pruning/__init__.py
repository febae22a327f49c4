"""Structured pruning: route and pipeline on top of three wings, scores/ (layer and unit criteria),
allocate/ (budget, parameter-cost model, allocators) and cut/ (surgery, compensation, the layer pass)."""
