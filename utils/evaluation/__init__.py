"""Evaluation: exact retrieval metrics, the nearest-neighbour search, the evaluate and embed commands."""
