"""The Message Batches API of the simulator, as the anthropic SDK (2.x) calls it.

    client.messages.batches.create(requests=[{"custom_id": ..., "params": {...}}, ...])
    client.messages.batches.retrieve(id) / list(limit=, after_id=, before_id=) / cancel(id)
    client.messages.batches.delete(id)      # only once ended
    client.messages.batches.results(id)     # JSONL at `results_url`, only once ended

Endpoints (handlers.py): `POST /v1/messages/batches`, `GET /v1/messages/batches` (newest
first; `data`, `has_more`, `first_id`, `last_id`; `limit` 1-1000, default 20),
`GET|DELETE /v1/messages/batches/{id}`, `POST /v1/messages/batches/{id}/cancel` and
`GET /v1/messages/batches/{id}/results`. Auth, version header, error bodies (with
`request_id`), `request-id` and rate-limit headers are those of `/v1/messages`. A batch
belongs to its key's workspace. Refusals: 400 for a batch-level error (intake.py), a results
or delete call before the end, a cancel after it, a bad list cursor; 404 for an unknown id.

Time is compressed (config `batches`, see `BatchSettings` in config.py): by default one
second stands for one of Anthropic's hours. A batch takes `processing_s` (or a draw up to
`processing_max_s`), its entries deciding evenly over that time; `expires_at` is
`created_at + expiry_s` (24 "hours") and the entries undecided then end `expired`; an ended
batch is deleted `retention_s` (29 "days") after its creation. Status: `in_progress`, then
`canceling` after a cancel, then `ended` with `ended_at` and `results_url`; `archived_at` is
always null. `request_counts` are the decisions made so far at every poll.

Each entry (processor.py) is checked like a `/v1/messages` body (an invalid one ends
`errored` with that error), may draw an injected `api_error` / `overloaded_error` or be left
to expire (`api_error_rate`, `overloaded_rate`, `expire_rate`, seeded by `seed` and the
batch's ordinal), and otherwise succeeds with the Message `/v1/messages` would answer, token
for token, with `usage.service_tier` "batch". Entries draw on no ITPM/OTPM bucket; a create
is one request against the key's RPM and, with `max_queued_requests` set, is refused with 429
`rate_limit_error` when the organisation's queued entries would exceed it. Results come in
a seeded shuffled order (`shuffle_results`) that is the same at every fetch.

Billing (stats.py): `GET /_sim/stats` has a `batches` section, tokens at the batch tier kept
out of the standard `input_tokens_total` / `output_tokens_total`. `GET /_sim/calls` adds
`batch_calls_by_custom_id` (`{"ok", "billed", "all"}` per custom_id, filtered by the same
`min_ok` / `min_billed` / `min_all`) and its totals `batch_calls`: a succeeded entry is one
billed call of its custom_id, so a request billed in two batches shows `billed: 2`. The
custom_id is taken as it is (the simulator cannot map it back to a request):
`calls.batch_custom_id(request_key)` is the mapping the gateway is expected to use, so a
verifier can add `batch_calls_by_custom_id[batch_custom_id(key)]` to `calls_by_request[key]`.
"""
