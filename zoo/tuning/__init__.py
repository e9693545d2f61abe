"""zoo × keras-tuner: hypermodels with gradient health per trial, and results as a table."""

from zoo.tuning.hypermodels import HyperCNN, HyperMLP
from zoo.tuning.results import tuner_results
from zoo.tuning.search_space import DEFAULT

__all__ = ["DEFAULT", "HyperCNN", "HyperMLP", "tuner_results"]
