"""Discrete-event simulation of a deployment plan under a request workload (no torch)."""
