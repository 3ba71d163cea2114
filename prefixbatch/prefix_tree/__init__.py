"""Prefix tree: the global token-level radix tree over every prompt of a job, and the plan built on it.

Plain data only: never imports torch.
"""
