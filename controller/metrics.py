"""The controller's Prometheus metrics (served on its own /metrics port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TASKS_DISPATCHED = Counter("dagsmith_tasks_dispatched_total", "Task attempts published to executors.", ["type"])
TASKS_COMPLETED = Counter(
    "dagsmith_tasks_completed_total",
    "Evaluated task attempts applied, by outcome (succeeded, retried, failed).",
    ["type", "outcome"],
)
RESULTS_IGNORED = Counter(
    "dagsmith_results_ignored_total", "Results that changed nothing (duplicates, stale attempts).", ["reason"]
)
WORKFLOWS_FINISHED = Counter("dagsmith_workflows_finished_total", "Workflows that reached a final status.", ["status"])
WORKFLOWS_PRUNED = Counter(
    "dagsmith_workflows_pruned_total", "Finished workflows deleted by the controller's retention (DAGSMITH_RETENTION)."
)
WORKFLOWS = Gauge("dagsmith_workflows", "Workflows by status (refreshed periodically).", ["status"])
RECONCILE_SECONDS = Histogram(
    "dagsmith_reconcile_duration_seconds",
    "Time of one reconciliation round (one transaction).",
    buckets=_LATENCY_BUCKETS,
)
ROUND_SIZE = Histogram(
    "dagsmith_reconcile_batch_size",
    "Messages applied per reconciliation round.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
DISPATCH_TO_START = Histogram(
    "dagsmith_dispatch_to_start_seconds",
    "From publishing a task to an executor starting it (queue wait).",
    ["type"],
    buckets=_LATENCY_BUCKETS,
)
RUN_SECONDS = Histogram(
    "dagsmith_task_run_seconds", "Executor run time of task attempts.", ["type"], buckets=_LATENCY_BUCKETS
)
FINISH_TO_DISPATCH = Histogram(
    "dagsmith_finish_to_successor_dispatch_seconds",
    "From a task finishing to its newly ready successor being published.",
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("dagsmith_queue_depth", "Messages ready in a RabbitMQ queue.", ["queue"])
LEASES_EXPIRED = Counter("dagsmith_leases_expired_total", "Running tasks whose executor stopped reporting.")
DEAD_LETTERS = Counter("dagsmith_dead_letters_total", "Task messages dead-lettered at the delivery limit.")
REDRIVES = Counter(
    "dagsmith_task_redrives_total",
    "Dead-lettered task messages sent again because no executor had started their last delivery.",
)
BUNDLES_SPLIT = Counter(
    "dagsmith_bundles_split_total", "Dead-lettered task bundles sent again as one message per task."
)
EXECUTORS_SILENT = Gauge(
    "dagsmith_executors_silent",
    "Executors heard from in the last 15 minutes whose heartbeats stopped without a goodbye (died or hung).",
)
EXECUTORS_ALIVE = Gauge(
    "dagsmith_executors_alive", "Executors that sent a heartbeat recently, by capability.", ["type"]
)
ROUNDS_FAILED = Counter(
    "dagsmith_rounds_failed_total",
    "Rounds of one message or one workflow that failed for a reason other than a lost connection.",
)
