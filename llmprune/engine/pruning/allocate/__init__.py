"""How much of each layer stays: the budget, the parameter-cost model and the allocators."""
