"""Foundations every other engine package uses: errors, paths and atomic writes,
device and dtype choice, progress events, process memory, the model hub's reachability."""
