"""Ingest: the Kafka consumer loop, backpressure and low-watermark offset commits."""
