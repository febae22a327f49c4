"""Per-layer structure read off tensor shapes alone: heads, KV heads, MLP width, GQA, tied embeddings.

Works from a {tensor name: shape} map, so that a file can be checked without
building a model, even one whose shapes fit no model at all.

heads % kv_heads == 0 is the same as q_out % k_out == 0 (both are multiples of
head_dim), so the GQA check needs no config; head counts do (head_dim comes
from the config, or from the model's attention modules).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from llmprune.engine.core.findings import Advice, Finding

LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # a decoder layer's tensors: model.layers.<i>.…

_ATTN = "self_attn"
_REQUIRED = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (None for embeddings, norm, lm_head)."""
    match = LAYER_NAME.search(name)
    return int(match.group(1)) if match else None


@dataclass
class LayerStructure:
    """One decoder layer as its weights describe it."""

    index: int
    hidden_size: int
    q_out: int
    k_out: int
    v_out: int
    mlp_width: int
    head_dim: int | None

    def _heads(self, width: int) -> int | None:
        return width // self.head_dim if self.head_dim and width % self.head_dim == 0 else None

    @property
    def heads(self) -> int | None:
        return self._heads(self.q_out)

    @property
    def kv_heads(self) -> int | None:
        return self._heads(self.k_out)

    @property
    def gqa_ratio(self) -> float | None:
        return self.q_out / self.k_out if self.k_out else None

    @property
    def gqa_ok(self) -> bool:
        return self.k_out > 0 and self.q_out % self.k_out == 0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "gqa_ratio": self.gqa_ratio,
            "gqa_ok": self.gqa_ok,
        }


@dataclass
class Structure:
    """The model's layout; `layers` holds only layers whose tensors were all found."""

    layers: list[LayerStructure] = field(default_factory=list)
    num_layers: int = 0
    head_dim: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    tied_embeddings: bool | None = None

    @property
    def uniform(self) -> bool:
        return len({(layer.q_out, layer.k_out, layer.mlp_width) for layer in self.layers}) <= 1

    @property
    def gqa_ratios(self) -> list[float]:
        return sorted({layer.gqa_ratio for layer in self.layers if layer.gqa_ratio is not None})

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied_embeddings,
            "uniform": self.uniform,
            "gqa_ratios": self.gqa_ratios,
            "layers": [layer.to_dict() for layer in self.layers],
        }


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
ADAPTER_MARKERS = (".lora_", ".lora_magnitude_vector", ".modules_to_save.")


def is_adapter_tensor(name: str) -> bool:
    """LoRA/PEFT adapter tensors: scanned for NaN/Inf, but not part of the model's structure."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def canonical_name(name: str) -> str:
    """The plain Llama tensor name behind DDP/compile/PEFT wrappers (PEFT's base_layer included)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name.replace(".base_layer.", ".")


def structure_shapes(named_shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """{canonical name: shape} without adapter tensors: what read_structure expects."""
    return {canonical_name(name): list(shape) for name, shape in named_shapes.items() if not is_adapter_tensor(name)}


def config_head_dim(config: Mapping) -> int | None:
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return None


def _expected_layers(config: Mapping, count: int) -> list[dict]:
    """Per-layer (heads, kv_heads, mlp width) that the config promises."""
    if config.get("layer_shapes"):
        return [
            {
                "heads": s["num_attention_heads"],
                "kv_heads": s["num_key_value_heads"],
                "mlp_width": s["intermediate_size"],
            }
            for s in config["layer_shapes"]
        ]
    one = {
        "heads": config.get("num_attention_heads"),
        "kv_heads": config.get("num_key_value_heads") or config.get("num_attention_heads"),
        "mlp_width": config.get("intermediate_size"),
    }
    return [one] * count


def read_structure(
    shapes: Mapping[str, Sequence[int]],
    config: Mapping | None = None,
    *,
    head_dim: int | None = None,
    config_role: str = "none",
) -> tuple[Structure, list[Finding]]:
    """The structure of the tensors in `shapes`, and what is wrong with it.

    config_role says what the config is to these weights:
    - "weights": it is their own config (a model directory): any mismatch is an error,
      because loading would fail;
    - "base": the architecture they were pruned from: smaller layers are expected and
      reported as info; a different hidden size, vocabulary or layer count is a "fit" error;
    - "none": used only for head_dim and tie_word_embeddings.
    """
    config = dict(config or {})
    findings: list[Finding] = []
    structure = Structure(head_dim=head_dim or config_head_dim(config))
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and len(embed) == 2:
        structure.vocab_size, structure.hidden_size = int(embed[0]), int(embed[1])
    indices = sorted({i for i in (layer_index(name) for name in shapes) if i is not None})
    structure.num_layers = len(indices)
    if indices and indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        findings.append(
            Finding(
                "error",
                "shape",
                f"model.layers.{missing[0]}",
                f"layer {missing[0]} has no tensors (layers {indices[0]}..{indices[-1]} expected contiguous)",
                [Advice.RESAVE, Advice.REPRUNE],
            )
        )

    for index in indices:
        layer, problems = _read_layer(index, shapes, structure)
        findings.extend(problems)
        if layer is not None:
            structure.layers.append(layer)

    structure.tied_embeddings = _tied(shapes, config, findings)
    if config_role != "none" and config:
        findings.extend(_compare_with_config(structure, config, config_role))
    return structure, findings


def _read_layer(
    index: int, shapes: Mapping[str, Sequence[int]], structure: Structure
) -> tuple[LayerStructure | None, list[Finding]]:
    prefix = f"model.layers.{index}."
    missing = [prefix + name for name in _REQUIRED if prefix + name not in shapes]
    if missing:
        return None, [
            Finding(
                "error",
                "shape",
                missing[0],
                f"layer {index} lacks {', '.join(m.removeprefix(prefix) for m in missing)}",
                [Advice.RESAVE, Advice.REPRUNE],
            )
        ]
    q, k, v, o = (shapes[prefix + f"{_ATTN}.{p}_proj.weight"] for p in "qkvo")
    gate, up, down = (shapes[prefix + f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
    hidden = structure.hidden_size or q[1]
    layer = LayerStructure(index, hidden, q[0], k[0], v[0], gate[0], structure.head_dim)
    problems = []

    def bad(tensor: str, message: str) -> None:
        problems.append(Finding("error", "shape", prefix + tensor, message, [Advice.RESAVE, Advice.REPRUNE]))

    for name, shape in (
        ("self_attn.q_proj.weight", q),
        ("self_attn.k_proj.weight", k),
        ("self_attn.v_proj.weight", v),
        ("mlp.gate_proj.weight", gate),
        ("mlp.up_proj.weight", up),
    ):
        if shape[1] != hidden:
            bad(name, f"{name} reads {shape[1]} inputs, the hidden size is {hidden}")
    for name, shape in (("self_attn.o_proj.weight", o), ("mlp.down_proj.weight", down)):
        if shape[0] != hidden:
            bad(name, f"{name} writes {shape[0]} outputs, the hidden size is {hidden}")
    if v[0] != k[0]:
        bad("self_attn.v_proj.weight", f"v_proj has {v[0]} outputs but k_proj has {k[0]}")
    if o[1] != q[0]:
        bad("self_attn.o_proj.weight", f"o_proj reads {o[1]} inputs but q_proj has {q[0]} outputs")
    if up[0] != gate[0] or down[1] != gate[0]:
        bad("mlp.down_proj.weight", f"MLP widths disagree: gate {gate[0]}, up {up[0]}, down reads {down[1]}")
    if layer.head_dim and (q[0] % layer.head_dim or k[0] % layer.head_dim):
        bad(
            "self_attn.q_proj.weight" if q[0] % layer.head_dim else "self_attn.k_proj.weight",
            f"q_proj {q[0]} / k_proj {k[0]} outputs are not whole heads of head_dim {layer.head_dim}",
        )
    if not layer.gqa_ok:
        heads = (
            f"{layer.heads} heads / {layer.kv_heads} KV heads"
            if layer.heads and layer.kv_heads
            else f"q_proj {q[0]} / k_proj {k[0]} outputs"
        )
        problems.append(
            Finding(
                "error",
                "gqa",
                f"model.layers.{index}.self_attn",
                f"GQA broken in layer {index}: {heads} (ratio {layer.gqa_ratio:.2f}, not a whole number): attention"
                " groups are misaligned",
                [Advice.WHOLE_GROUPS, Advice.EVEN_HEADS],
            )
        )
    return layer, problems


def _tied(shapes: Mapping[str, Sequence[int]], config: Mapping, findings: list[Finding]) -> bool:
    says_tied = bool(config.get("tie_word_embeddings", False))
    if "lm_head.weight" in shapes:
        head = shapes["lm_head.weight"]
        embed = shapes.get("model.embed_tokens.weight")
        if embed is not None and list(head) != list(embed):
            findings.append(
                Finding(
                    "error",
                    "shape",
                    "lm_head.weight",
                    f"lm_head {list(head)} and embed_tokens {list(embed)} disagree",
                    [Advice.CHECK_CONFIG, Advice.RESAVE],
                )
            )
        return says_tied
    if config and not says_tied:
        findings.append(
            Finding(
                "error",
                "shape",
                "lm_head.weight",
                "lm_head.weight is missing and the config does not tie it to the embeddings",
                [Advice.CHECK_CONFIG, Advice.RESAVE],
            )
        )
    return True


def _compare_with_config(structure: Structure, config: Mapping, role: str) -> list[Finding]:
    """Mismatches between the tensors and the config (their own, or their base model's)."""
    findings = []
    fit_severity, fit_check = ("error", "shape") if role == "weights" else ("error", "fit")
    for key, found in (
        ("num_hidden_layers", structure.num_layers),
        ("hidden_size", structure.hidden_size),
        ("vocab_size", structure.vocab_size),
    ):
        expected = config.get(key)
        if expected is not None and found is not None and int(expected) != found:
            findings.append(
                Finding(
                    fit_severity,
                    fit_check,
                    key,
                    f"the tensors have {key} = {found}, the config says {expected}",
                    [Advice.CHECK_CONFIG],
                )
            )
    expected_layers = _expected_layers(config, structure.num_layers)
    pruned = []
    for layer in structure.layers:
        if layer.index >= len(expected_layers):
            continue
        expected = expected_layers[layer.index]
        found = {"heads": layer.heads, "kv_heads": layer.kv_heads, "mlp_width": layer.mlp_width}
        diffs = [
            f"{key} {found[key]} vs {expected[key]}"
            for key in found
            if expected[key] is not None and found[key] is not None and found[key] != expected[key]
        ]
        if not diffs:
            continue
        if role == "weights":
            findings.append(
                Finding(
                    "error",
                    "shape",
                    f"model.layers.{layer.index}",
                    f"layer {layer.index} does not match config.json ({', '.join(diffs)}): it will not load",
                    [Advice.RESAVE, Advice.CHECK_CONFIG],
                )
            )
        elif any(found[key] is not None and expected[key] is not None and found[key] > expected[key] for key in found):
            findings.append(
                Finding(
                    "error",
                    "fit",
                    f"model.layers.{layer.index}",
                    f"layer {layer.index} is larger than the base model ({', '.join(diffs)})",
                    [Advice.CHECK_CONFIG],
                )
            )
        else:
            pruned.append(layer.index)
    if pruned:
        findings.append(
            Finding(
                "info",
                "shape",
                f"{len(pruned)} layers",
                f"layers {format_ranges(pruned)} are smaller than the base model (pruned)",
                [],
            )
        )
    return findings


def format_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for position, value in enumerate(indices):
        if start is None:
            start = value
        if position + 1 == len(indices) or indices[position + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)
