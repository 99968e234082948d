"""Built-in task types, enough for real demos offline. Importing this package registers them all."""

from executors.builtins import basic, chaos, http, json_ops, python_call, shell, text

__all__ = ["basic", "chaos", "http", "json_ops", "python_call", "shell", "text"]
