"""Analyses of finished tuning runs: optimum scaling with the token budget, and tuning curves."""
