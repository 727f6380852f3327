"""Residual Attention Network (Wang et al., CVPR 2017) as a reproducible pipeline.

Importing ``ran`` is cheap on purpose: torch, ffcv, mlflow and great_expectations are
imported inside the functions that need them, so ``ran-cli --help`` answers at once.
"""

__version__ = "0.1.0"
