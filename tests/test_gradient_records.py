"""GradientRecords: growing storage, reads, clipped fields, the DataFrame round trip."""

import numpy as np
import pandas as pd
import pytest

from kgrad.records.gradient_records import COLUMNS, GradientRecords, VariableInfo

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

INFOS = [
    VariableInfo("dense", 0, "kernel", "kernel"),
    VariableInfo("dense", 0, "bias", "bias"),
    VariableInfo("dense_1", 1, "kernel", "kernel"),
]


def _rows(first: int, count: int, scale: float = 1.0) -> dict:
    steps = np.arange(first, first + count)
    grad = scale * (steps[:, None] + np.arange(3)[None, :] / 10.0)
    return {
        "step": steps,
        "epoch": first // 10,
        "grad_norm": grad,
        "weight_norm": grad + 100.0,
        "global_norm": np.sqrt((grad**2).sum(axis=1)),
    }


def test_appends_equal_one_concatenation():
    records = GradientRecords(INFOS, run="r")
    parts = [_rows(0, 5), _rows(5, 1), _rows(6, 40), _rows(46, 3)]
    for part in parts:
        records.append(**part)

    assert len(records) == 49
    np.testing.assert_array_equal(records.steps, np.arange(49))
    np.testing.assert_array_equal(records.epochs, np.repeat([0, 0, 0, 4], [5, 1, 40, 3]))
    whole = np.concatenate([part["grad_norm"] for part in parts]).astype(np.float32)
    np.testing.assert_array_equal(records.grad_norms, whole)
    np.testing.assert_array_equal(records.weight_norms, whole + np.float32(100.0))
    assert records.grad_norms.dtype == np.float32 and records.steps.dtype == np.int64
    assert records.clipped_grad_norms is None and records.clipped_global_norms is None


def test_empty_records():
    records = GradientRecords(INFOS)
    assert len(records) == 0
    assert records.grad_norms.shape == (0, 3) and records.steps.shape == (0,)
    assert records.clipped_grad_norms is None
    frame = records.to_dataframe()
    assert list(frame.columns) == COLUMNS and len(frame) == 0
    records.append(**_rows(0, 0))
    assert len(records) == 0


def test_reads_are_views_that_an_append_leaves_alone():
    records = GradientRecords(INFOS)
    records.append(**_rows(0, 4))
    before = records.grad_norms
    kept = before.copy()
    for first in range(4, 200, 7):  # grows the capacity several times
        records.append(**_rows(first, 7))
    np.testing.assert_array_equal(before, kept)
    assert records.grad_norms.base is not None  # a view, not a copy
    with pytest.raises(ValueError, match="read-only"):
        records.global_norms[0] = 0.0


def test_clipped_fields_equal_raw_where_no_transform_ran():
    records = GradientRecords(INFOS)
    records.append(**_rows(0, 2))
    clipped = _rows(2, 3, scale=0.5)
    records.append(
        **_rows(2, 3),
        clipped_grad_norm=clipped["grad_norm"],
        clipped_global_norm=clipped["global_norm"],
    )
    records.append(**_rows(5, 2))

    raw = records.grad_norms
    np.testing.assert_array_equal(records.clipped_grad_norms[:2], raw[:2])
    np.testing.assert_allclose(records.clipped_grad_norms[2:5], clipped["grad_norm"])
    np.testing.assert_array_equal(records.clipped_grad_norms[5:], raw[5:])
    np.testing.assert_allclose(records.clipped_global_norms[2:5], clipped["global_norm"])
    np.testing.assert_array_equal(records.clipped_global_norms[5:], records.global_norms[5:])
    frame = records.to_dataframe()
    np.testing.assert_allclose(
        frame.clipped_grad_norm.to_numpy()[6:15], clipped["grad_norm"].reshape(-1)
    )


def test_a_row_of_the_wrong_width_is_refused():
    records = GradientRecords(INFOS)
    with pytest.raises(ValueError, match="Expected 3 norms per row, received 2"):
        records.append(
            step=[0], epoch=0, grad_norm=[[1.0, 2.0]], weight_norm=[[1.0, 2.0]],
            global_norm=[1.0],
        )
    assert len(records) == 0


def test_dataframe_round_trip():
    records = GradientRecords(INFOS, run="r")
    records.append(**_rows(0, 3))
    records.append(**_rows(3, 2), clipped_grad_norm=_rows(3, 2, 0.5)["grad_norm"])
    frame = records.to_dataframe()

    assert list(frame.columns) == COLUMNS and len(frame) == 5 * 3
    assert frame.layer.tolist()[:3] == ["dense", "dense", "dense_1"]
    assert frame.variable.tolist()[:3] == ["kernel", "bias", "kernel"]
    again = GradientRecords.from_dataframe(frame)
    np.testing.assert_array_equal(again.steps, records.steps)
    np.testing.assert_array_equal(again.grad_norms, records.grad_norms)
    np.testing.assert_array_equal(again.clipped_grad_norms, records.clipped_grad_norms)
    np.testing.assert_array_equal(again.weight_norms, records.weight_norms)
    pd.testing.assert_frame_equal(again.to_dataframe(), frame)


def test_layer_norms_and_first_to_last_over_appended_rows():
    records = GradientRecords(INFOS)
    records.append(step=[0], epoch=0, grad_norm=[[3.0, 4.0, 10.0]],
                   weight_norm=[[1, 1, 1]], global_norm=[1.0])
    records.append(step=[1], epoch=0, grad_norm=[[6.0, 8.0, 5.0]],
                   weight_norm=[[1, 1, 1]], global_norm=[1.0])
    layers, total = records.layer_norms("total")
    assert layers == ["dense", "dense_1"]
    np.testing.assert_allclose(total, [[5.0, 10.0], [10.0, 5.0]])
    np.testing.assert_allclose(records.first_to_last("total"), [0.5, 2.0])


def test_a_long_run_reallocates_a_logarithmic_number_of_times():
    """1,000 epochs of 100 rows: the storage doubles (about log2 of the rows
    reallocations) instead of being copied at every append or read."""
    infos = [VariableInfo(f"dense_{d}", d, "kernel", "kernel") for d in range(100)]
    records = GradientRecords(infos)
    ones = np.ones((100, 100), np.float32)
    storages = set()
    for epoch in range(1000):
        records.append(step=np.arange(100) + 100 * epoch, epoch=epoch, grad_norm=ones,
                       weight_norm=ones, global_norm=ones[:, 0])
        assert records.global_norms[-100:].shape == (100,)
        storages.add(id(records._arrays["grad_norm"]))
    assert len(records) == 100_000
    np.testing.assert_array_equal(records.steps, np.arange(100_000))
    assert len(storages) <= 14  # 100 -> 200 -> ... -> 102,400 rows
    assert records.nbytes <= 2 * 100_000 * (2 * 100 * 4 + 16)
