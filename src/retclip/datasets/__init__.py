"""Datasets with pixel annotation, read from their standard on-disk formats."""

from retclip.datasets.ade20k import Ade20kPanoptic
from retclip.datasets.coco_panoptic import CocoPanopticDataset, PanopticAnnotation

__all__ = ["Ade20kPanoptic", "CocoPanopticDataset", "PanopticAnnotation"]
