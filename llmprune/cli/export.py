"""`llmprune export`: a model as one GGUF file for llama.cpp (and ollama, LM Studio)."""

from __future__ import annotations

from typing import Annotated

import typer

from llmprune.cli.common import BaseModelOpt, JsonOpt, ModelArg, TrustPickleOpt


def export_command(
    model: ModelArg,
    gguf: Annotated[str, typer.Option("--gguf", help="Output file (.gguf).")],
    outtype: Annotated[
        str, typer.Option("--outtype", help="f32|f16|bf16|q8_0 for the weight matrices (norms and biases stay f32).")
    ] = "f16",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing GGUF file at --gguf (any other file is never replaced)."),
    ] = False,
    base_model: BaseModelOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Write MODEL (pruned or not, uniform or per-layer shapes) as a GGUF file that llama.cpp runs."""
    from llmprune.engine.io.gguf_export import ExportConfig, export_gguf
    from llmprune.ui.console import console, print_json, progress_callback
    from llmprune.ui.export_report import export_report

    config = ExportConfig(
        model=model, out=gguf, outtype=outtype, base_model=base_model, trust_pickle=trust_pickle, overwrite=overwrite
    )
    config.validate()
    with progress_callback("writing tensors", enabled=not json_output) as progress:
        result = export_gguf(config, progress=progress)
    if json_output:
        print_json(result.to_dict())
    else:
        console.print(export_report(result))
