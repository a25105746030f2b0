"""Test support: real services (Kafka, Redis) and helpers shared by the test suites."""
