"""Egress: publish each outcome (response or dead letter), with a billed call's metering
record, and wait for the broker's ack."""
