"""Analyses of logged runs that need nothing but the metric records."""
