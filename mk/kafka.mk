# The local Apache Kafka broker (scripts/kafka_local.py) and Debian's redis-server.
KAFKA_DIR ?= .run/kafka
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: kafka-fetch kafka-up kafka-down redis-server-install

kafka-fetch:
	@python3 scripts/kafka_local.py fetch >/dev/null

kafka-up: kafka-fetch
	@python3 scripts/kafka_local.py start --dir $(KAFKA_DIR)

kafka-down:
	@python3 scripts/kafka_local.py stop --dir $(KAFKA_DIR)

redis-server-install:
	@command -v redis-server >/dev/null || { \
	  echo "installing Debian's redis-server"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
