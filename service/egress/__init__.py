"""Egress: publish each outcome (response or dead letter) and wait for the broker's ack."""
