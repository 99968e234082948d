"""The controller: keeps each workflow's DAG in Postgres and reconciles it with what executors report."""
