"""Resilience for calls to backends: retries with backoff and a budget, circuit breaking, admission control."""
