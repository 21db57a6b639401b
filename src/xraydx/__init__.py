"""xraydx: train, evaluate, explain and serve 3-class chest X-ray classifiers, honest about shortcuts."""

__version__ = "0.1.0"
__all__ = ["__version__"]
