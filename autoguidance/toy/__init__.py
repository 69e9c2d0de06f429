"""The exact 2D toy of Karras et al. (2024): the tree mixture, its metrics and plots."""
from .mixture import CLASSES, GaussianMixture, tree_components, tree_mixture

__all__ = ["CLASSES", "GaussianMixture", "tree_components", "tree_mixture"]
