"""Scheduling: per-partner queues and concurrency, fair turns, and the rate limiters."""
