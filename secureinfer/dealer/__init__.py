"""Correlated randomness: what a model needs, and how the dealer generates it."""
