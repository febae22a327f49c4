"""The thin Typer layer: options -> config dataclass -> engine function -> renderer."""
