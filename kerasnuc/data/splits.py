"""Reproducible splits grouped by source image (crops of one image never straddle two sides)."""

import numpy as np


def train_val_test_split(names, val_fraction=0.15, test_fraction=0.15, seed=0):
    """Shuffle the image names with ``seed`` and cut into train/val/test name lists.

    At least one image goes to each non-empty fraction when there are 3 or more images.
    """
    names = sorted(names)
    if len(names) < 3:
        raise ValueError(f"need at least 3 images to split into train/val/test, got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = max(1, int(round(test_fraction * len(names)))) if test_fraction > 0 else 0
    n_val = max(1, int(round(val_fraction * len(names)))) if val_fraction > 0 else 0
    test = [names[i] for i in order[:n_test]]
    val = [names[i] for i in order[n_test:n_test + n_val]]
    train = [names[i] for i in order[n_test + n_val:]]
    if not train:
        raise ValueError("no images left for training after the validation and test split")
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
