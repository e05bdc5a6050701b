"""Closed forms of the deep unconstrained features model: the DNC optimum (dnc.py) and the
low-rank triangle competitor (triangle.py). Derivations: docs/theory.md. He & Su's law of data
separation fitted to measured layers (separation.py)."""

from dnc.theory.dnc import DNCOptimum, dnc_loss, dnc_optimum, lambda_vector, local_minimum_structure
from dnc.theory.separation import separation_fit
from dnc.theory.triangle import TriangleOptimum, triangle_loss, triangle_optimum

__all__ = ["DNCOptimum", "dnc_optimum", "dnc_loss", "lambda_vector", "local_minimum_structure",
           "triangle_loss", "TriangleOptimum", "triangle_optimum", "separation_fit"]
