"""The test suite's view of :mod:`dagsmith.local`."""

from dagsmith.local import ROOT, free_port
from dagsmith.local import LocalStack as Stack

__all__ = ["ROOT", "Stack", "free_port"]
