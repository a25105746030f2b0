# The local Apache Kafka broker (scripts/kafka_local.py) and Debian's redis-server.
#   make kafka-fetch           broker jars from Maven Central into ~/.cache/claude-gateway (no-op when cached)
#   make kafka-up              start it into $(KAFKA_DIR); prints the bootstrap; no-op when already running
#   make kafka-down            stop it (safe when not running)
#   make kafka-status          say whether it serves
#   make redis-server-install  Debian's redis-server, when it is not on PATH
PY ?= .venv/bin/python
KAFKA_DIR ?= .run/kafka
KAFKA_PORT ?= 0
# The script is stdlib only: before `make setup` made the venv, python3 runs it.
KAFKA_LOCAL = $(if $(wildcard $(PY)),$(PY),python3) scripts/kafka_local.py
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: kafka-fetch kafka-up kafka-down kafka-status redis-server-install

kafka-fetch:
	@$(KAFKA_LOCAL) fetch >/dev/null

kafka-up: kafka-fetch
	@$(KAFKA_LOCAL) start --dir $(KAFKA_DIR) --port $(KAFKA_PORT)

kafka-down:
	@$(KAFKA_LOCAL) stop --dir $(KAFKA_DIR)

kafka-status:
	@$(KAFKA_LOCAL) status --dir $(KAFKA_DIR)

redis-server-install:
	@command -v redis-server >/dev/null || { \
	  echo "installing Debian's redis-server"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }

# The whole stack for a manual run (scripts/local_stack.py): the local broker, the Claude
# simulator and the gateway with config.example.yaml rendered into .run/up/config.yaml.
#   make up     start all three in the background; prints the broker, the console URL, the token file
#   make down   stop them (the gateway drains first); safe to repeat
.PHONY: up down

up: setup kafka-fetch
	@$(PY) scripts/local_stack.py up

down:
	@$(PY) scripts/local_stack.py down
