"""Reporting: the pictures of a run, live visdom curves, and the report over many runs."""
