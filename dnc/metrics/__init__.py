"""Collapse metrics: streaming state (class_means.py: pass 1, accumulators.py: pass 2 and the
drivers), pure formulas (formulas.py; duality.py: NC3) and the Parquet driver that writes tidy
tables (streaming.py). Definitions and conventions: docs/metrics.md."""

from dnc.metrics.accumulators import (
    ClassMeanAccumulator,
    ResidualAccumulator,
    check_finite,
    layer_metrics,
    metrics_from_chunks,
)
from dnc.metrics.duality import weight_metrics
from dnc.metrics.formulas import ClassMeans, Convention, MeansGeometry, means_metrics
from dnc.metrics.ood import OODAccumulator, ood_metrics

__all__ = ["Convention", "ClassMeanAccumulator", "ClassMeans", "MeansGeometry", "ResidualAccumulator",
           "check_finite", "layer_metrics", "means_metrics", "metrics_from_chunks", "weight_metrics",
           "OODAccumulator", "ood_metrics"]
