"""sharpfast: fast, exact sharpness measures for PyTorch models."""
__version__ = "0.1.0"
