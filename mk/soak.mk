# The soak (bench/soak.py): one gateway under ten minutes of pause/resume churn (max_queue 20,
# max_poll_records 20, ~100 mixed requests/s, a backlog in Kafka); fails (exit 1) when its RSS
# grows by more than 10% after the warm-up. Not part of `make test`, which runs its short
# version (tests/integration/test_soak.py, 50 s).
#   make soak                                   10 min measured after 2 min of warm-up
#   make soak SOAK_ARGS="--soak-duration-s 120"   options: .venv/bin/python -m bench --help
# One JSON line on stdout (RSS samples included); logs in .run/bench/soak/.
SOAK_ARGS ?=

.PHONY: soak

soak: setup kafka-fetch
	$(PY) -m bench --only soak $(SOAK_ARGS)
