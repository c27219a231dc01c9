"""`python -m utils.tune`: an Optuna study whose trials are sacred runs under evaluation.protocol=validation."""
