"""Pruning a trained model to measured latency targets (``nas-prune``): coupled channel groups
(Torch-Pruning's dependency graph), importance criteria, per-layer ratio searches under a measured
cost, and the pruned model's folder (:func:`load_pruned` rebuilds it without pickle)."""
from nas.prune.export import load_pruned, write_pruned

__all__ = ["load_pruned", "write_pruned"]
