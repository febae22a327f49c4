"""How much each decoder layer matters: one registry of layer criteria, one name each (higher = more important).

- `removal`: increase of the calibration loss when the layer is skipped (the
  walker re-runs only the layers after it: L(L-1)/2 layer passes);
- `block-influence`: 1 - cosine similarity of a layer's input and output hidden
  states, averaged over tokens (ShortGPT); one forward pass;
- `taylor`: sum over the layer's weights of |w * dL/dw| (first-order Taylor
  estimate of the loss change when the layer's weights are zeroed, LLM-Pruner's
  element-wise criterion summed per layer); one forward + backward pass.

Each criterion is a small class: its name, a one-line description (the
command line's help is made from them), and whether it can stream (walk the
layers one at a time from disk; a backward pass through the whole model
cannot). Torch-free on purpose: `--help` lists them without loading torch; the
measuring itself is in `layer_importance` (in memory) and
`layer_importance_streamed` (from disk). Other criteria plug in with
`register_layer_score`.
"""

from __future__ import annotations

from llmprune.engine.core.errors import UserInputError

__all__ = [
    "LayerScore",
    "LAYER_SCORES",
    "DEFAULT_LAYER_SCORE",
    "register_layer_score",
    "get_layer_score",
    "layer_scores_help",
]


class LayerScore:
    """A layer criterion: `walked` ones are computed by the one layer walker (`layer_importance.walked_scores`).

    A criterion the walker does not compute is measured on the whole model in memory: the built-in `taylor` by
    `layer_importance.taylor_scores`, a registered one by its `measure_in_memory(model, windows, batch_size,
    progress) -> (scores, base loss, decoder-layer calls on a batch)`.
    """

    name: str = ""
    description: str = ""
    can_stream: bool = False  # measurable one layer at a time from disk
    walked: bool = False  # computed by the layer walker
    measure_in_memory = None


class Removal(LayerScore):
    name = "removal"
    description = "loss increase when the layer is skipped"
    can_stream = True
    walked = True


class BlockInfluence(LayerScore):
    name = "block-influence"
    description = "1 - cos(in, out)"
    can_stream = True
    walked = True


class Taylor(LayerScore):
    name = "taylor"
    description = "|w·grad|"


LAYER_SCORES: dict[str, LayerScore] = {score.name: score for score in (Removal(), BlockInfluence(), Taylor())}
DEFAULT_LAYER_SCORE = "removal"


def register_layer_score(score: LayerScore) -> None:
    """Make a layer criterion available by its name (to --importance-method and the Python API)."""
    LAYER_SCORES[score.name] = score


def get_layer_score(name: str, stream: bool = False) -> LayerScore:
    """The criterion called `name`; the one place an --importance-method is checked (one line, exit 2)."""
    if name not in LAYER_SCORES:
        raise UserInputError(f"unknown --importance-method '{name}'", f"use one of {', '.join(LAYER_SCORES)}")
    score = LAYER_SCORES[name]
    if stream and not score.can_stream:
        streamable = ", ".join(n for n, s in LAYER_SCORES.items() if s.can_stream)
        raise UserInputError(
            f"--importance-method {name} cannot stream (it needs gradients through the whole model)",
            f"use one of {streamable} with --stream, or drop --stream",
        )
    return score


def layer_scores_help() -> str:
    """'removal (loss increase when the layer is skipped), ...': the command line's help, from the registry."""
    return ", ".join(f"{score.name} ({score.description})" for score in LAYER_SCORES.values())
