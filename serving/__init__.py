"""Serving side and the command-line interface (the top layer)."""
