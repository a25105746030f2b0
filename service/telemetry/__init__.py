"""Telemetry: Prometheus metrics, OpenTelemetry traces, structured logs, health."""
