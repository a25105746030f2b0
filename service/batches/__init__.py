"""The Message Batches path: requests that can wait go to Anthropic's batches at half price.

`routing.py` decides per request; the pipeline hands a batch-bound request to the
pending topic in the transaction that finishes its input offset; the worker
(`worker.py`, `pending.py`) forms batches, records each durably before and after creating it
(`records.py`), polls, and publishes every result exactly once (`results.py`).
See docs/batches.md.
"""
