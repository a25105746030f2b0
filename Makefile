# Claude Partner Gateway. Two commands for a newcomer: `make demo` and `make test`.
# Every target installs what it needs; nothing is assumed but python3, java and mvn.

SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := .tools/bin/uv
PY := .venv/bin/python
export UV_PYTHON_DOWNLOADS := never

.DEFAULT_GOAL := help
.PHONY: help setup test test-unit test-secure-kafka lint demo bench clean

help:
	@echo "make demo   - start a local Kafka, the Claude simulator and the gateway; send partner traffic; summarise"
	@echo "make up     - the local broker, the simulator and the gateway in the background (make down stops them)"
	@echo "make test   - every test (unit, integration on a real Kafka and Redis, chart and Dockerfile checks)"
	@echo "make test-secure-kafka - the gateway on a SASL_SSL/SCRAM-SHA-512 Kafka with a private CA (not in make test)"
	@echo "make lint   - ruff and mypy --strict"
	@echo "make bench  - benchmarks, one JSON object per line"
	@echo "make chaos  - kill -9, broker restart, scaling and faults under load; exactly one outcome each (not in make test)"
	@echo "make soak   - ten minutes of pause/resume churn; fails when the gateway's RSS grows over 10% (not in make test)"

$(UV):
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-groups --quiet
	touch $@

setup: .venv/.synced

include mk/*.mk

# Two workers (pytest-xdist), each with its own broker; a file's tests stay on one worker.
# Most tests wait on brokers and timers, not the CPU: on 2 cores this halves the run.
TEST_WORKERS ?= 2
# The secured-broker file has its own target (a broker of its own, ~40 s): make test stays under 10 minutes.
SECURE_KAFKA_TESTS := tests/integration/test_secure_kafka.py
test: setup kafka-fetch redis-server-install deploy-tools browser-install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --ignore=$(SECURE_KAFKA_TESTS)

# The gateway on Kafka secured as production brokers are: SASL_SSL, SCRAM-SHA-512, TLS from a
# private CA made by openssl for the run, sessions of 3 s; a SCRAM password rotated at run time.
test-secure-kafka: setup kafka-fetch
	$(PY) -m pytest -q $(SECURE_KAFKA_TESTS)

test-unit: setup
	$(PY) -m pytest -q tests/unit tests/simulator

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check service bench scripts claude-gateway-client
	.venv/bin/mypy
	$(PY) scripts/gen_request_schema.py --check

demo: setup kafka-fetch
	$(PY) scripts/demo.py

bench: setup kafka-fetch redis-server-install
	$(PY) -m bench

clean:
	rm -rf .run .venv .tools .mypy_cache .ruff_cache .pytest_cache
