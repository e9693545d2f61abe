"""Streaming CSV of gradient records, appended across runs and safe across crashes."""

from __future__ import annotations

import os

import pandas as pd

from kgrad.records.gradient_records import COLUMNS
from kgrad.records.paths import check_writable_file


class CsvSink:
    """Appends tidy gradient records to a CSV file.

    Every `write` opens the file in append mode, writes and closes it, so the file is
    complete up to the last write even when the process dies afterwards. A header is
    written only when the file is empty; every row carries its `run` id, so several
    `fit()` calls (or several programs) can share one file.

    Args:
        path: The CSV file. Its folder is created if needed.

    Raises:
        ValueError: if the file cannot be written.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = check_writable_file(path, "csv_path")

    def write(self, frame: pd.DataFrame) -> None:
        """Appends `frame` (columns of `GradientRecords.to_dataframe`)."""
        if frame.empty:
            return
        header = os.path.getsize(self.path) == 0
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            frame.to_csv(handle, header=header, index=False, columns=COLUMNS)
            handle.flush()
            os.fsync(handle.fileno())
