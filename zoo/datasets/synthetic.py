"""Small synthetic 2-D classification sets, generated with numpy from a seed."""

from __future__ import annotations

import numpy as np

SPIRAL_POINTS_PER_CLASS = 500
BLOB_POINTS_PER_CLASS = 200
BLOB_CLASSES = 3


def spirals_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns two interleaved spirals: 1,000 points in about [-1, 1]², labels 0 and 1.

    Each spiral turns 1.5 times around the origin, the second one the first rotated by
    180 degrees; Gaussian noise of standard deviation 0.03 is added to every coordinate.
    A linear model scores about 50 %, so it rewards depth.

    Args:
        seed: Seed of the numpy generator.

    Returns:
        `(x, y)`: float32 points of shape (1000, 2) and int32 labels of shape (1000,).

    References:
        Lang & Witbrock 1988, "Learning to Tell Two Spirals Apart".
    """
    rng = np.random.default_rng(seed)
    # sqrt spreads the points evenly along the curve rather than bunching them at the centre.
    angle = np.sqrt(rng.uniform(size=SPIRAL_POINTS_PER_CLASS)) * 3 * np.pi
    radius = angle / (3 * np.pi)
    arm = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    x = np.concatenate([arm, -arm]) + rng.normal(scale=0.03, size=(2 * len(arm), 2))
    y = np.repeat(np.arange(2), SPIRAL_POINTS_PER_CLASS)
    return x.astype(np.float32), y.astype(np.int32)


def blobs_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns three Gaussian blobs: 600 points in 2-D, labels 0, 1 and 2.

    The centres sit on the unit circle 120 degrees apart; each blob has standard deviation
    0.3 per coordinate, so the classes overlap a little.

    Args:
        seed: Seed of the numpy generator.

    Returns:
        `(x, y)`: float32 points of shape (600, 2) and int32 labels of shape (600,).
    """
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(BLOB_CLASSES) / BLOB_CLASSES
    centres = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = np.repeat(np.arange(BLOB_CLASSES), BLOB_POINTS_PER_CLASS)
    x = centres[y] + rng.normal(scale=0.3, size=(len(y), 2))
    return x.astype(np.float32), y.astype(np.int32)
