"""`load(name)`: small classification data sets with a fixed, seeded train/test split.

| name            | examples | input (vectors / images) | classes | needs download |
| --------------- | -------- | ------------------------ | ------- | -------------- |
| `digits`        | 1,797    | (64,) / (8, 8, 1)        | 10      | no             |
| `spirals`       | 1,000    | (2,)                     | 2       | no             |
| `blobs`         | 600      | (2,)                     | 3       | no             |
| `mnist`         | 70,000   | (784,) / (28, 28, 1)     | 10      | yes            |
| `fashion_mnist` | 70,000   | (784,) / (28, 28, 1)     | 10      | yes            |
| `cifar10`       | 60,000   | (3072,) / (32, 32, 3)    | 10      | yes            |
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from zoo.builders._checks import is_int_at_least
from zoo.builders._checks import is_real_in
from zoo.datasets import digits
from zoo.datasets import downloaded
from zoo.datasets import synthetic
from zoo.datasets.dataset import Dataset

DEFAULT_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class _Source:
    # fetch(seed) -> (x, y, n_test): all examples, images as (N, H, W, C), and the size of
    # the official test split at the end of the arrays (None when the set has none).
    fetch: Callable[[int], tuple[np.ndarray, np.ndarray, int | None]]
    num_classes: int
    images: bool
    needs_download: bool


def _unsplit(arrays: Callable[[int], tuple[np.ndarray, np.ndarray]], seed: int):
    x, y = arrays(seed)
    return x, y, None


def _keras_source(name: str) -> _Source:
    return _Source(
        fetch=lambda seed: downloaded.download_arrays(name),
        num_classes=10,
        images=True,
        needs_download=True,
    )


_SOURCES: dict[str, _Source] = {
    "digits": _Source(functools.partial(_unsplit, digits.digits_arrays), 10, True, False),
    "spirals": _Source(functools.partial(_unsplit, synthetic.spirals_arrays), 2, False, False),
    "blobs": _Source(
        functools.partial(_unsplit, synthetic.blobs_arrays),
        synthetic.BLOB_CLASSES,
        False,
        False,
    ),
    "mnist": _keras_source("mnist"),
    "fashion_mnist": _keras_source("fashion_mnist"),
    "cifar10": _keras_source("cifar10"),
}


def list_datasets(include_downloads: bool = True) -> list[str]:
    """Returns the sorted names that `load` accepts.

    Args:
        include_downloads: Whether to include the sets that need a download (`mnist`,
            `fashion_mnist`, `cifar10`). Defaults to `True`.

    Returns:
        The names, sorted.

    Example:

    >>> list_datasets(include_downloads=False)
    ['blobs', 'digits', 'spirals']
    """
    return sorted(
        name for name, source in _SOURCES.items()
        if include_downloads or not source.needs_download
    )


def load(
    name: str = "digits",
    *,
    as_images: bool = False,
    test_fraction: float | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads a classification data set as normalized train and test arrays.

    Inputs are float32 (pixels scaled to [0, 1]: digits divided by 16, the downloaded sets
    by 255) and labels int32 class indices. The split is stratified by class
    (`sklearn.model_selection.train_test_split(stratify=y, random_state=seed)`), so the same
    arguments always give the same arrays. For `digits` with the defaults that is 1,437
    training and 360 test examples.

    Args:
        name: One of `list_datasets()`: `"digits"`, `"spirals"`, `"blobs"` (offline) or
            `"mnist"`, `"fashion_mnist"`, `"cifar10"` (through `keras.datasets`, which
            downloads them once). Defaults to `"digits"`.
        as_images: Return image sets as `(height, width, channels)` arrays instead of flat
            vectors. Only for image sets. Defaults to `False`.
        test_fraction: Fraction of the examples held out for testing, in (0, 1). Defaults to
            `None`: `0.2`, or the official split for the downloaded sets (a fraction
            re-splits them).
        seed: Seed of the split and of the synthetic generators, an integer >= 0. Defaults
            to `0`.

    Returns:
        A `Dataset` with `x_train`, `y_train`, `x_test`, `y_test`, `num_classes`,
        `input_shape` and `name`.

    Raises:
        ValueError: If `name` is unknown (the message lists the data sets), `as_images=True`
            for a set that has no images, or `test_fraction` or `seed` is out of range.
        ConnectionError: If a downloaded set is requested and the download fails, or the
            `ZOO_OFFLINE` environment variable is set to `1`.

    Example:

    >>> data = load("digits", as_images=True)
    >>> data.x_train.shape, data.x_test.shape, data.num_classes
    ((1437, 8, 8, 1), (360, 8, 8, 1), 10)
    """
    if name not in _SOURCES:
        offline = list_datasets(include_downloads=False)
        online = [key for key in list_datasets() if key not in offline]
        raise ValueError(
            f"Unknown data set: name={name!r}. Available offline: {', '.join(offline)}; "
            f"through a download: {', '.join(online)}."
        )
    source = _SOURCES[name]
    if as_images and not source.images:
        image_sets = sorted(key for key, value in _SOURCES.items() if value.images)
        raise ValueError(
            f"`as_images=True` needs an image data set; {name!r} holds 2-D points. "
            f"Image data sets: {', '.join(image_sets)}. Received: name={name!r}"
        )
    if test_fraction is not None and not is_real_in(
        test_fraction, 0.0, 1.0, include_low=False
    ):
        raise ValueError(
            "`test_fraction` must be a float in (0, 1), or None for the default split. "
            f"Received: test_fraction={test_fraction!r}"
        )
    if not is_int_at_least(seed, 0):
        raise ValueError(f"`seed` must be an integer >= 0. Received: seed={seed!r}")

    x, y, official_test_size = source.fetch(int(seed))
    if test_fraction is None and official_test_size is not None:
        n_train = len(x) - official_test_size
        x_train, x_test, y_train, y_test = x[:n_train], x[n_train:], y[:n_train], y[n_train:]
    else:
        from sklearn.model_selection import train_test_split

        x_train, x_test, y_train, y_test = train_test_split(
            x,
            y,
            test_size=DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction,
            stratify=y,
            random_state=int(seed),
        )
    if source.images and not as_images:
        x_train = x_train.reshape(len(x_train), -1)
        x_test = x_test.reshape(len(x_test), -1)
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=source.num_classes,
        input_shape=tuple(x_train.shape[1:]),
        name=name,
    )
