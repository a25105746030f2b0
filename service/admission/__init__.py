"""Admission: decide whether a Kafka record becomes a Claude call, or a dead letter and why."""
