"""The exact 2D toy of Karras et al. (2024): the tree-shaped Gaussian mixture (its metrics are in
`autoguidance.metrics.toy`, its plots in `autoguidance.experiments.toy_plot`)."""
from .mixture import CLASSES, GaussianMixture, tree_components, tree_mixture

__all__ = ["CLASSES", "GaussianMixture", "tree_components", "tree_mixture"]
