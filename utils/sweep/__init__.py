"""`python -m utils.sweep`: a grid of settings and seeds as sacred runs in one -F folder (utils/sweep/__main__.py)."""
