"""Models in and out: model specs to a loaded model, saved checkpoints, weight
sources read without building a model, safetensors copying, the remote modeling code."""
