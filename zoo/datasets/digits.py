"""scikit-learn's bundled 8×8 handwritten digits: real images that need no download."""

from __future__ import annotations

import numpy as np


def digits_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the 1,797 digits as (N, 8, 8, 1) float32 images in [0, 1] and int32 labels.

    Pixel counts (0 to 16) are divided by 16. `seed` is unused: the set is fixed.

    References:
        Alpaydin & Kaynak 1998, "Optical Recognition of Handwritten Digits", UCI Machine
        Learning Repository (the copy bundled with scikit-learn's `load_digits`).
    """
    from sklearn.datasets import load_digits

    del seed
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., np.newaxis]
    return images, bunch.target.astype(np.int32)
