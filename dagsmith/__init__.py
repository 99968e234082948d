"""Dagsmith: the pieces every service shares — the workflow spec, wire messages, settings and the CLI."""

__version__ = "0.1.0"
