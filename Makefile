# windowpipe: `make demo` runs the whole pipeline on this machine; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv services test test-fast lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Redis, PostgreSQL and RabbitMQ for the integration tests: start each one that is down.
services:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
	@pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 || \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@(echo > /dev/tcp/127.0.0.1/5672) >/dev/null 2>&1 || \
	  (rabbitmq-server -detached >/dev/null 2>&1 || true)
	@for i in $$(seq 1 60); do \
	  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && \
	  pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && exit 0; sleep 1; done; \
	  echo "redis or postgresql did not come up" >&2; exit 1

# `make lint` first, so CI checks it too.
test: lint services
	$(VENV)/bin/pytest -q

test-fast: venv
	$(VENV)/bin/pytest -q -m "not integration"

# ruff, mypy, and import-linter: imports go windowpipe -> workers -> connectors -> core only
# (the contracts are in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

demo: venv
	$(VENV)/bin/windowpipe demo

bench: venv services
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo
