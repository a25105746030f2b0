"""The Message Batches API: placeholder docstring (see below)."""
