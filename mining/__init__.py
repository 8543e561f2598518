"""Activation mining: shard a corpus, run a model with hooks, reduce, store, query."""

__version__ = "0.1.0"
