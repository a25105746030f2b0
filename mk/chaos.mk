# The chaos suite (bench/chaos): kill -9, broker restart, scaling, 20% upstream faults, a quarter of
# the traffic through Message Batches (kills and failpoints aimed at the batch worker); a verifier
# counts outcomes (read_committed) and the simulator's calls per request, real-time and batch. Not
# part of `make test`, which runs its short version (tests/integration/test_chaos.py).
#   make chaos                          the chaos run (10,000 requests), then the rebalance run (3,000)
#   make chaos CHAOS_ARGS="--seed 7"    options for both runs (.venv/bin/python -m bench.chaos --help)
# Each run prints one JSON line; logs of every process stay in .run/chaos/<time>-<mode>-seed<seed>/.
CHAOS_ARGS ?=

.PHONY: chaos

chaos: setup kafka-fetch redis-server-install
	@status=0; \
	$(PY) -m pytest -q -m long tests/integration/test_exactly_once.py tests/integration/test_batches.py || status=1; \
	$(PY) -m bench.chaos --mode chaos $(CHAOS_ARGS) || status=1; \
	$(PY) -m bench.chaos --mode rebalance $(CHAOS_ARGS) || status=1; \
	exit $$status
