"""A small two-stage task (sklearn digits) used by the example, the tests and the CLI."""
from .digits import DigitsClassifier, DigitsDataModule, DigitsDataset, load_backbone
from .progress import EpochProgress

__all__ = ["DigitsClassifier", "DigitsDataModule", "DigitsDataset", "EpochProgress", "load_backbone"]
