"""Labeled-only and fully supervised baselines: the SegmentationModule as is.

The data decides which: ``labeled: 7`` with a single labeled stream is SSL4MIS's labeled-only baseline,
``labeled: 70`` its fully supervised upper bound (experiments/acdc/{supervised,fully_supervised}.yaml).
"""
from lightning_modules.segmentation import SegmentationModule


class Supervised(SegmentationModule):
    """0.5 * (CE + Dice) on labeled batches; nothing else."""
