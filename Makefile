# One target per habit. Each one sets up what it needs (virtualenv, Postgres, RabbitMQ) first.
VENV ?= $(or $(DAGSMITH_VENV),.venv)
export DAGSMITH_VENV := $(VENV)

.PHONY: dev test lint unit setup services

dev: setup services  ## run every service locally (API on http://127.0.0.1:8000)
	$(VENV)/bin/dagsmith dev

test:  ## lint, type-check and run every test against real Postgres and RabbitMQ
	bash scripts/test.sh

unit: setup  ## the fast tests only (no services needed)
	$(VENV)/bin/python -m pytest tests/unit -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

setup:
	bash scripts/setup.sh

services:
	bash scripts/services.sh
