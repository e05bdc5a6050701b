"""Collapse metrics: streaming state (accumulators.py), pure formulas (formulas.py) and the Parquet
driver that writes tidy tables (streaming.py). Definitions and conventions: docs/metrics.md."""

from dnc.metrics.accumulators import (
    ClassMeanAccumulator,
    ResidualAccumulator,
    check_finite,
    layer_metrics,
    metrics_from_chunks,
)
from dnc.metrics.formulas import ClassMeans, Convention, MeansGeometry, means_metrics, weight_metrics
from dnc.metrics.ood import OODAccumulator, ood_metrics

__all__ = ["Convention", "ClassMeanAccumulator", "ClassMeans", "MeansGeometry", "ResidualAccumulator",
           "check_finite", "layer_metrics", "means_metrics", "metrics_from_chunks", "weight_metrics",
           "OODAccumulator", "ood_metrics"]
