"""Allocate: the budget, the one parameter-cost model, every allocator (global ranking, the layer-importance plan)."""
