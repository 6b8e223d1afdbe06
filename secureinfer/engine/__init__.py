"""Runs a model graph on secret shares inside one party's Session."""
