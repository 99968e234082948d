"""The test suite's view of :mod:`dagsmith.local`."""

from dagsmith.local import LocalStack as Stack
from dagsmith.local import free_port

__all__ = ["Stack", "free_port"]
