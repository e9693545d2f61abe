"""Records of gradient norms and the sinks that write them."""

from kgrad.records.csv_sink import CsvSink
from kgrad.records.gradient_records import COLUMNS, GradientRecords, VariableInfo
from kgrad.records.tensorboard_sink import TensorBoardSink

__all__ = ["COLUMNS", "CsvSink", "GradientRecords", "TensorBoardSink", "VariableInfo"]
