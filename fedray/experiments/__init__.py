"""Experiments built on federated runs: one run, compare, cv, centralized baseline, sweeps."""
