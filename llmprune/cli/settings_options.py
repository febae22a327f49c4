"""Command-line options generated from the engine's settings dataclasses: one name per option, everywhere.

Fine-tuning's settings (`FinetuneConfig`) become the options of `llmprune
finetune`; a recipe's values (`PruneSettings`, the `FinetuneConfig` fields a
recipe sets) and the run's budget (`PipelineSettings`) become options of
`llmprune recipe NAME` and `recipe sweep`, from the dataclass fields
themselves: the type, the default and the help (the field's docstring) are not
declared a second time. A `tuple[str, ...]` field is one comma-separated
option. `OPTION_NAMES` is the one table of the field guide's names where a
field's own name is not the option's (`importance` is `--importance-method`,
as on `prune` and `analyze`); the old names stay as hidden aliases for one
release.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from typing import Annotated, Any, get_type_hints

import typer

# field -> (option name, hidden old names); a bool field's option is "--x/--no-x"
OPTION_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "importance": ("--importance-method", ("--importance",)),
    "strategy": ("--pruning-strategy", ("--strategy",)),
    "prune_mlp": ("--prune-mlp", ("--mlp",)),
    "calibration_samples": ("--importance-samples", ("--calibration-samples",)),
}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (litgpt style), read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flag(name: str, kind: Any, renamed: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    flag, aliases = OPTION_NAMES.get(name, (renamed.get(name, "--" + name.replace("_", "-")), ()))
    if kind is bool:
        return f"{flag}/--no-{flag[2:]}", tuple(f"{a}/--no-{a[2:]}" for a in aliases)
    return flag, aliases


def _plain(kind: Any) -> Any:
    """int | None as a runtime union (what Typer reads)."""
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    return args[0] | None if len(args) == 1 and type(None) in getattr(kind, "__args__", ()) else kind


def _is_name_list(kind: Any) -> bool:
    """tuple[str, ...]: given on the command line as one comma-separated option."""
    return getattr(kind, "__origin__", None) is tuple and getattr(kind, "__args__", ()) == (str, Ellipsis)


def settings_parameters(
    cls: type,
    defaults: Any = None,
    *,
    prefix: str,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    renamed: dict[str, str] | None = None,
    optional: bool = False,
) -> list[inspect.Parameter]:
    """Keyword parameters for a Typer command: one option per field of `cls` (plus hidden aliases).

    Parameter names are `prefix + field` (aliases: `prefix + field + "__alias"`). `defaults`
    gives the defaults (a recipe's values); with `optional` every default is None
    ("keep the recipe's value", e.g. for the sweep's overrides). `only` keeps just those
    fields; `renamed` gives a field another option name where its own would clash with
    another class's on the same command (fine-tuning's batch size on `recipe NAME`).
    """
    hints, docs = get_type_hints(cls), field_docs(cls)
    parameters = []
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init or (only is not None and field.name not in only):
            continue
        kind = _plain(hints[field.name])
        flag, aliases = _flag(field.name, kind, renamed or {})
        default = None if optional else getattr(defaults, field.name) if defaults is not None else field.default
        if _is_name_list(kind):
            kind, default = str, default if default is None else ",".join(default)
        shown = kind | None if optional else kind
        help_text = docs.get(field.name, "") + (" (default: the recipe's)" if optional else "")
        parameters.append(
            inspect.Parameter(
                prefix + field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[shown, typer.Option(flag, help=help_text)],
            )
        )
        for number, alias in enumerate(aliases):
            hidden = Annotated[kind | None, typer.Option(alias, hidden=True)]
            parameters.append(
                inspect.Parameter(
                    f"{prefix}{field.name}__alias{number}",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=hidden,
                )
            )
    return parameters


def settings_values(cls: type, values: dict[str, Any], *, prefix: str) -> dict[str, Any]:
    """The field values of `cls` from a command's keyword arguments (an old alias given wins over the default)."""
    hints = get_type_hints(cls)
    result = {}
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        if name not in values:
            continue
        given = [values[key] for key in values if key.startswith(name + "__alias") and values[key] is not None]
        value = given[0] if given else values[name]
        if isinstance(value, str) and _is_name_list(_plain(hints[field.name])):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        result[field.name] = value
    return result


def with_signature(function: Any, parameters: list[inspect.Parameter]) -> Any:
    """Give `function(**kwargs)` the signature Typer builds its options from."""
    function.__signature__ = inspect.Signature(parameters)
    function.__annotations__ = {p.name: p.annotation for p in parameters}
    return function
