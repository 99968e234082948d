"""The Kubernetes operator: ``Workflow`` resources in, the store's state back out in ``.status``.

Public surface: :func:`run_operator` and :class:`OperatorOptions` (what ``dagsmith operator``
uses), and :func:`controller.operator.crd.render` (the CRD the Helm chart ships).
"""

from controller.operator.runner import OperatorOptions, run_operator

__all__ = ["OperatorOptions", "run_operator"]
