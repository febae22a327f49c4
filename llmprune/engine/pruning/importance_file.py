"""Names of the layer-importance config file that `analyze` writes and `prune` reads.

A module of its own, with no imports, so that the CLI can show the default file
name in its help without loading torch.
"""

CONFIG_FORMAT = "llmprune.layer_importance/1"
DEFAULT_CONFIG_NAME = "layer_importance_config.json"
