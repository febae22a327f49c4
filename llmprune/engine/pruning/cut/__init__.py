"""Cut: surgery on the real transformers modules, compensation of what was removed, the one layer pass, depth."""
