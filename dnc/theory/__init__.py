"""Closed forms of the deep unconstrained features model: the DNC optimum (dnc.py) and the
low-rank triangle competitor (triangle.py). Derivations: docs/theory.md."""

from dnc.theory.dnc import DNCOptimum, dnc_loss, dnc_optimum, lambda_vector, local_minimum_structure
from dnc.theory.triangle import TriangleOptimum, triangle_loss, triangle_optimum

__all__ = ["DNCOptimum", "dnc_optimum", "dnc_loss", "lambda_vector", "local_minimum_structure",
           "triangle_loss", "TriangleOptimum", "triangle_optimum"]
