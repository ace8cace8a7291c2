"""promptseg: text-prompted medical image segmentation."""

__version__ = "0.1.0"
