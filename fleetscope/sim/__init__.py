"""Synthetic workloads for the demo and tests: they report through the real client, like a real job."""
