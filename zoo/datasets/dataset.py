"""The `Dataset` record that `zoo.datasets.load` returns."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set split into train and test arrays.

    Attributes:
        x_train: Training inputs, float32, shape `(n_train,) + input_shape`.
        y_train: Training labels, int32 class indices in `[0, num_classes)`, shape
            `(n_train,)`.
        x_test: Test inputs, float32, shape `(n_test,) + input_shape`.
        y_test: Test labels, int32, shape `(n_test,)`.
        num_classes: Number of classes.
        input_shape: Shape of one example, e.g. `(64,)` or `(8, 8, 1)`; pass it to a
            builder's `input_shape`.
        name: The data set's name, e.g. `"digits"`.

    Example:

    >>> data = Dataset(np.zeros((4, 2), "float32"), np.array([0, 1, 0, 1], "int32"),
    ...                np.zeros((2, 2), "float32"), np.array([0, 1], "int32"), 2, (2,), "toy")
    >>> data
    Dataset(name='toy', x_train=(4, 2), x_test=(2, 2), num_classes=2, input_shape=(2,))
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    name: str

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, x_train={self.x_train.shape}, "
            f"x_test={self.x_test.shape}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape})"
        )
