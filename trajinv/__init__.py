"""trajinv: tune lr and weight decay along the trajectory-invariance direction."""
__version__ = "0.1.0"
