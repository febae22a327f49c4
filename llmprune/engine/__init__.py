"""The engine: everything llmprune does, callable from Python with no terminal.

Nothing in this package imports Typer, Rich or Textual.
"""
