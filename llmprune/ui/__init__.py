"""Renderers: Rich output for commands, the Textual dashboard for training."""
