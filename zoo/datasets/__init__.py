"""Small classification data sets with a fixed, seeded split; `digits` works offline.

Example:

>>> from zoo import datasets
>>> data = datasets.load("digits")
>>> data.input_shape, data.num_classes
((64,), 10)
"""

from zoo.datasets.dataset import Dataset
from zoo.datasets.downloaded import OFFLINE_ENV_VAR
from zoo.datasets.loading import list_datasets
from zoo.datasets.loading import load

__all__ = ["OFFLINE_ENV_VAR", "Dataset", "list_datasets", "load"]
