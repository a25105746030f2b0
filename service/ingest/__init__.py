"""Ingest: the Kafka consumer loop, backpressure and low-watermark offset commits."""

from service.ingest import fetch_cycles

# before any consumer fetches: aiokafka's dropped fetch buffers must not be garbage cycles
fetch_cycles.install()
