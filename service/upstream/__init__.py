"""Upstream: calling Claude with the partner's key, classifying errors, the retry policy."""
