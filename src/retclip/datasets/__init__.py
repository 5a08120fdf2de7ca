"""Datasets with pixel annotation, read from their standard on-disk formats."""

from retclip.datasets.coco_panoptic import CocoPanopticDataset, PanopticAnnotation

__all__ = ["CocoPanopticDataset", "PanopticAnnotation"]
