"""Data sets that `keras.datasets` downloads: usable only with a network or a warm cache."""

from __future__ import annotations

import os

import keras
import numpy as np

OFFLINE_ENV_VAR = "ZOO_OFFLINE"
"""Set this environment variable to `1` to fail at once instead of trying to download."""


def download_arrays(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Loads a `keras.datasets` set as float32 images in [0, 1] with int32 labels.

    Args:
        name: `"mnist"`, `"fashion_mnist"` or `"cifar10"`.

    Returns:
        `(x, y, n_test)`: train and test images concatenated, shape (N, H, W, C), the
        labels, and how many of the last examples form the official test split.

    Raises:
        ConnectionError: If the download fails (or `ZOO_OFFLINE=1` forbids it); the cause
            is chained.
    """
    advice = (
        f"Data set {name!r} must be downloaded by `keras.datasets.{name}.load_data()`"
    )
    suggestion = (
        "Connect to the network, put the file in ~/.keras/datasets, or use the bundled "
        "`zoo.datasets.load('digits')`, which needs no download."
    )
    if os.environ.get(OFFLINE_ENV_VAR, "") not in ("", "0"):
        raise ConnectionError(
            f"{advice}, but {OFFLINE_ENV_VAR}={os.environ[OFFLINE_ENV_VAR]} forbids "
            f"downloads. {suggestion}"
        )
    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as error:  # keras.utils.get_file wraps URLError in a bare Exception.
        raise ConnectionError(
            f"{advice}, and the download failed: {error}. {suggestion}"
        ) from error
    x = np.concatenate([x_train, x_test]).astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., np.newaxis]
    y = np.concatenate([y_train, y_test]).reshape(-1).astype(np.int32)
    return x, y, len(x_test)
