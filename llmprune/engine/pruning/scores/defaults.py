"""The unit criteria each path uses when none is asked for (torch-free: the command line shows them)."""

DEFAULT_UNIT_SCORE = "obs"  # the global and streamed paths (the default prune)
# The plan path's unit score when none is asked: recipes measure on a few calibration windows, where
# OBS's Hessian estimate is poor (make demo's attention prune: PPL 68.9 with obs, 62.0 with fluctuation).
PLAN_UNIT_SCORE = "fluctuation"
