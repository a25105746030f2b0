"""The chaos suite: exactly one outcome per request, and Claude billed once, under crashes.

    make chaos                                    # both runs below; exit 1 if either fails
    .venv/bin/python -m bench.chaos [--mode chaos|rebalance] [--requests N] [--seed S] ...

One run starts, all on loopback and all its own: a local Kafka broker (`scripts/kafka_local.py`,
data kept across its restart), Debian's redis-server, the Claude simulator with 20% injected
faults (7% 500, 7% 529, 6% connections dropped after the work) and gateway replicas as
separate processes (`python -m service run`) sharing the org limit through Redis. Three
partners (`alpha` and `bravo` with `on_unknown: deadletter`, `charlie` with
`on_unknown: retry` when the gateway knows that setting) send requests of mixed sizes
(40 B to 40 kB of prompt), models and max_tokens, content types (30% with images, a PDF or
tool definitions) and Kafka headers (60% with a W3C `traceparent`, some with `tracestate`;
none to 80 application headers, up to 16 KiB, binary, null, not UTF-8, repeated):
bench/chaos/traffic.py.

- `--mode chaos` (default 10,000 requests): kill -9 of a random replica every 3-7 s, each
  restarted a second later; a scale from 3 replicas to 4 (at 30% of the traffic) and down to 2
  (at 70%, graceful); one broker restart at 50% (SIGTERM, start with the data kept); one
  FLUSHALL of Redis at 40% (`--redis-wipes`), as a Redis restarted without persistence: the
  replicas must find it (`redis_losses_found`, their log lines) and go on.
  A quarter of the requests (`--batch-share`, 0 turns it off) can wait: `service_class:
  batch` or `auto` with a deadline two hours away, so the gateways (`batches.enabled`, short
  timings) put them in Message Batches, which the simulator takes 2-6 s to process
  (`--batch-processing`), 12% of their entries errored or left to expire (they are batched
  again or served in real time). Half the kills (`--batch-worker-kills`) aim at the batch
  worker, and half the replica starts during the chaos (`--batch-failpoints`) end at a step
  of the batch worker as kill -9 would: after an intent is recorded, between a create and
  the record of its id, between two transactions of results.
- `--mode rebalance` (default 3,000 requests): no crash. Every request is produced at once (a
  backlog, as when an autoscaler scales out; 8 calls per partner and replica, a median
  latency of 1 s so that calls are in flight at each step); a replica joins
  when 25% of the requests have an outcome, and once it is ready and 60% have one, a replica
  leaves gracefully. Here `called_twice` must be 0 as well.

A replica that exits by itself is restarted, as Kubernetes would (`replica_unexpected_exits`).
When the traffic is sent and the chaos is over, the harness waits (up to
`--outcome-timeout`, 300 s) until every request has an outcome, stops the replicas, and the
verifier (bench/chaos/verify.py, definitions there) counts. stdout gets one JSON line:

    {"bench": "chaos", "requests": 10000, "lost": 0, "duplicate_outcomes": 0, "called_twice": N,
     "called_twice_unexplained": 0, "outcome_unknown": K, "outcome_unknown_unexplained": U,
     "trace_context_lost": 0, "kills": M, "broker_restarts": 1,
     "batch_share": 0.25, "batch_requests": 2456, "batch_lost": 0, "batch_duplicated": 0,
     "batch_billed_twice": B, "batch_billed_twice_unexplained": 0, "batches_created": C,
     "kills_with_batches_in_progress": P, "kills_of_batch_worker": W, "failpoint_exits": {...},
     "wall_s": ..., "mode": "chaos", ... "passed": true}

(after those figures come details: seed, timings, replica starts, dead-letter reasons,
`billed_twice`, the requests whose trace context was judged and which outcomes lost it, the
batch path's own (served by batch or in real time, billed in two batches
or in a batch and in real time, real-time requests found in a batch, the simulator's entry
results, its recoveries counted in the replicas' logs), transactions left open on outcome
partitions, the run dir; `failures`, when any, shows examples of each). A request's calls are
its real-time calls plus its batch entries (by `custom_id`); definitions in verify.py.
Exit status: 0 when passed, 1 when not (lost, duplicate_outcomes, called_twice_unexplained,
trace_context_lost (an outcome without its request's trace id) or, with batches,
batch_billed_twice_unexplained or realtime_in_a_batch above 0, or no batch
created; in the rebalance mode also called_twice, outcome_unknown_unexplained (an unknown
outcome the simulator's dropped connections do not explain), stops_leaving_calls (graceful
stops that exited 75: their drain left claimed calls unpublished) and batch_billed_twice), 2 when the run
itself failed (its line then carries `error`). Progress goes to stderr; every process's log
stays in the run dir (`.run/chaos/<time>-<mode>-seed<seed>/`, with the simulator's call
counts in `calls.json`).
Every child process is stopped at the end, also on failure or Ctrl-C, and is killed by the
kernel if the harness itself is killed.
"""

from bench.chaos.harness import passed, run_chaos
from bench.chaos.options import ChaosOptions

__all__ = ["ChaosOptions", "passed", "run_chaos"]
