"""Compact in-memory records of gradient and weight norms, and their tidy DataFrame.

Records are stored as one growing NumPy array per field (one row per logged step, one
column per tracked variable), so appends and reads stay cheap however long the run, and
100,000 steps of a 50-layer model fit in well under 200 MB. The long, tidy DataFrame that
users read is built on demand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from kgrad import stats

ProfileKind = Literal["bias", "kernel", "total", "auto"]

COLUMNS = [
    "run",
    "step",
    "epoch",
    "layer",
    "depth",
    "variable",
    "kind",
    "grad_norm",
    "weight_norm",
    "clipped_grad_norm",
    "global_norm",
]


@dataclasses.dataclass(frozen=True)
class VariableInfo:
    """The description of one recorded column: which variable of which layer."""

    layer: str
    depth: int
    variable: str
    kind: str


@dataclasses.dataclass
class _Chunk:
    """Views of the stored rows under the names of `append`'s arguments."""

    step: np.ndarray  # (n,) int64
    epoch: np.ndarray  # (n,) int32
    grad_norm: np.ndarray  # (n, V) float32
    weight_norm: np.ndarray  # (n, V) float32
    global_norm: np.ndarray  # (n,) float32
    clipped_grad_norm: np.ndarray | None  # (n, V) float32, when a transform ran
    clipped_global_norm: np.ndarray | None  # (n,) float32


# The stored fields: name -> (dtype, one value per variable).
_FIELDS = {
    "step": (np.int64, False),
    "epoch": (np.int32, False),
    "grad_norm": (np.float32, True),
    "weight_norm": (np.float32, True),
    "global_norm": (np.float32, False),
    "clipped_grad_norm": (np.float32, True),
    "clipped_global_norm": (np.float32, False),
}
_CLIPPED = ("clipped_grad_norm", "clipped_global_norm")


class GradientRecords:
    """Gradient and weight norms per logged step and per tracked variable.

    The rows live in one preallocated array per field whose capacity doubles when it
    fills up (as a Python list grows), so an append costs time in proportion to the
    rows it adds, amortized over a long run, and every read (`steps`, `grad_norms`, ...)
    is a view of the rows so far, not a copy. The two clipped fields are allocated at
    the first append that carries them; before that (and for later rows without them)
    they equal the raw norms.

    Args:
        variables: The recorded columns, ordered by depth.
        run: An identifier of the `fit()` call these records come from.

    Example:

    >>> records = GradientRecords([VariableInfo("dense", 0, "kernel", "kernel")], "r0")
    >>> records.append(step=[0], epoch=[0], grad_norm=[[1.0]], weight_norm=[[2.0]],
    ...                global_norm=[1.0])
    >>> records.to_dataframe()[["step", "layer", "grad_norm"]].values.tolist()
    [[0, 'dense', 1.0]]
    """

    def __init__(self, variables: Sequence[VariableInfo], run: str = ""):
        self.variables = list(variables)
        self.run = run
        self._rows = 0
        self._arrays: dict[str, np.ndarray] = {
            name: self._allocate(name, 0)
            for name in _FIELDS
            if name not in _CLIPPED
        }

    def _allocate(self, name: str, capacity: int) -> np.ndarray:
        dtype, per_variable = _FIELDS[name]
        shape = (capacity, len(self.variables)) if per_variable else (capacity,)
        return np.empty(shape, dtype)

    def __len__(self) -> int:
        return self._rows

    @property
    def layers(self) -> list[str]:
        """Recorded layer names, in depth order."""
        seen: dict[str, None] = {}
        for info in self.variables:
            seen.setdefault(info.layer, None)
        return list(seen)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays (their whole capacity)."""
        return sum(array.nbytes for array in self._arrays.values())

    def append(
        self,
        *,
        step: Sequence[int] | np.ndarray,
        epoch: Sequence[int] | np.ndarray,
        grad_norm: Sequence[Sequence[float]] | np.ndarray,
        weight_norm: Sequence[Sequence[float]] | np.ndarray,
        global_norm: Sequence[float] | np.ndarray,
        clipped_grad_norm: np.ndarray | None = None,
        clipped_global_norm: np.ndarray | None = None,
    ) -> None:
        """Adds rows (one per logged step) to the records.

        Raises:
            ValueError: When a row does not hold one norm per recorded variable.
        """
        step = np.asarray(step, dtype=np.int64).reshape(-1)
        count = len(step)
        if count == 0:
            return
        width = len(self.variables)
        rows = {
            "step": step,
            "epoch": np.broadcast_to(np.asarray(epoch, dtype=np.int32), step.shape),
            "grad_norm": np.asarray(grad_norm, dtype=np.float32).reshape(count, -1),
            "weight_norm": np.asarray(weight_norm, dtype=np.float32),
            "global_norm": np.asarray(global_norm, dtype=np.float32),
        }
        if rows["grad_norm"].shape[1] != width:
            raise ValueError(
                f"Expected {width} norms per row, received {rows['grad_norm'].shape[1]}."
            )
        rows["weight_norm"] = rows["weight_norm"].reshape(count, width)
        clipped = {
            "clipped_grad_norm": clipped_grad_norm,
            "clipped_global_norm": clipped_global_norm,
        }
        for name, value in clipped.items():
            raw = rows[name.replace("clipped_", "")]
            if value is not None:
                rows[name] = np.asarray(value, dtype=np.float32).reshape(raw.shape)
                if name not in self._arrays:  # earlier rows: clipped == raw
                    self._arrays[name] = self._arrays[name.replace("clipped_", "")].copy()
            elif name in self._arrays:  # rows without a transform: clipped == raw
                rows[name] = raw
        end = self._rows + count
        capacity = len(self._arrays["step"])
        if end > capacity:
            capacity = max(end, 2 * capacity, 16)
            for name, array in self._arrays.items():
                grown = self._allocate(name, capacity)
                grown[: self._rows] = array[: self._rows]
                self._arrays[name] = grown
        for name, array in self._arrays.items():
            array[self._rows : end] = rows[name]
        self._rows = end

    def _stored(self, field: str, writeable: bool = False) -> np.ndarray | None:
        """The rows so far of `field`, or `None` for a clipped field that no append
        carried: a view, read-only unless `writeable`, so that no reader changes the
        records by accident."""
        array = self._arrays.get(field)
        if array is None:
            return None
        view = array[: self._rows]
        view.flags.writeable = writeable
        return view

    @property
    def _chunks(self) -> list[_Chunk]:
        # For callers that wrote into the stored arrays of the former chunked layout
        # (tests/test_zoo_tuning_health.py); these views write through.
        return [_Chunk(**{name: self._stored(name, True) for name in _FIELDS})]

    @property
    def steps(self) -> np.ndarray:
        """The logged step indices, shape `(n,)`."""
        return self._stored("step")

    @property
    def epochs(self) -> np.ndarray:
        """The epoch of each logged step, shape `(n,)`."""
        return self._stored("epoch")

    @property
    def grad_norms(self) -> np.ndarray:
        """Gradient norms, shape `(n_steps, n_variables)`."""
        return self._stored("grad_norm")

    @property
    def weight_norms(self) -> np.ndarray:
        """Weight norms at the step, shape `(n_steps, n_variables)`."""
        return self._stored("weight_norm")

    @property
    def global_norms(self) -> np.ndarray:
        """The global gradient norm over all trainable variables, shape `(n,)`."""
        return self._stored("global_norm")

    @property
    def clipped_grad_norms(self) -> np.ndarray | None:
        """Norms of the gradients handed to the optimizer after clipping, or `None`."""
        return self._stored("clipped_grad_norm")

    @property
    def clipped_global_norms(self) -> np.ndarray | None:
        """The global norm after clipping, or `None` when nothing clipped."""
        return self._stored("clipped_global_norm")

    def layer_norms(self, kind: ProfileKind = "total") -> tuple[list[str], np.ndarray]:
        """Per-layer gradient norms for each logged step.

        Args:
            kind: Which variables of a layer to combine: `"bias"`, `"kernel"`,
                `"total"` (all of them) or `"auto"` (bias where every recorded layer
                has one, else total). Bias norms follow the backpropagated signal
                δ, while kernel norms can stay flat in a ReLU net whose δ vanishes
                (REFERENCES.md, trap 2). Defaults to `"total"`.

        Returns:
            The layer names (depth order) and an array `(n_steps, n_layers)`; NaN
            where a layer has no variable of that kind.
        """
        if kind == "auto":
            has_bias = {info.layer for info in self.variables if info.kind == "bias"}
            kind = "bias" if set(self.layers) <= has_bias else "total"
        layers = self.layers
        norms = self.grad_norms.astype(np.float64)
        out = np.full((norms.shape[0], len(layers)), np.nan)
        for column, layer in enumerate(layers):
            picked = [
                i
                for i, info in enumerate(self.variables)
                if info.layer == layer and (kind == "total" or info.kind == kind)
            ]
            if picked:
                out[:, column] = stats.combine_norms(norms[:, picked], axis=1)
        return layers, out

    def first_to_last(self, kind: ProfileKind = "auto") -> np.ndarray:
        """The first-to-last layer gradient ratio at each logged step.

        Args:
            kind: See `layer_norms`. Defaults to `"auto"`.

        Returns:
            Array `(n_steps,)`; layers without a variable of `kind` are skipped.
        """
        _, profile = self.layer_norms(kind)
        present = ~np.all(np.isnan(profile), axis=0) if len(profile) else []
        profile = profile[:, present] if len(profile) else profile
        if profile.shape[1] < 1:
            return np.full(profile.shape[0], np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            return profile[:, 0] / profile[:, -1]

    def to_dataframe(self) -> pd.DataFrame:
        """The records as a tidy DataFrame, one row per (step, variable).

        Returns:
            Columns `run, step, epoch, layer, depth, variable, kind, grad_norm,
            weight_norm, clipped_grad_norm, global_norm`; `clipped_grad_norm` is the
            norm handed to the optimizer (equal to `grad_norm` when nothing clips).
        """
        n_steps, n_vars = len(self), len(self.variables)
        clipped = self.clipped_grad_norms
        grad = self.grad_norms
        frame = pd.DataFrame(
            {
                "run": pd.Categorical([self.run] * (n_steps * n_vars)),
                "step": np.repeat(self.steps, n_vars),
                "epoch": np.repeat(self.epochs, n_vars),
                "layer": pd.Categorical.from_codes(
                    np.tile(
                        [self.layers.index(info.layer) for info in self.variables],
                        n_steps,
                    ).astype(np.int32),
                    categories=self.layers,
                )
                if n_vars
                else [],
                "depth": np.tile([info.depth for info in self.variables], n_steps),
                "variable": np.tile(
                    [info.variable for info in self.variables], n_steps
                ).astype(object),
                "kind": np.tile([info.kind for info in self.variables], n_steps).astype(
                    object
                ),
                "grad_norm": grad.reshape(-1),
                "weight_norm": self.weight_norms.reshape(-1),
                "clipped_grad_norm": (grad if clipped is None else clipped).reshape(-1),
                "global_norm": np.repeat(self.global_norms, n_vars),
            },
            columns=COLUMNS,
        )
        return frame

    @classmethod
    def from_dataframe(cls, frame: pd.DataFrame) -> "GradientRecords":
        """Rebuilds records from a DataFrame of `to_dataframe` (or a logger CSV).

        When the frame holds several runs, their steps are concatenated in file order.
        """
        missing = [c for c in ("step", "layer", "variable", "grad_norm") if c not in frame]
        if missing:
            raise ValueError(
                f"The table lacks the columns {missing}; it must come from "
                "`GradientNormLogger` (`to_dataframe()` or `csv_path=`). Columns "
                f"received: {list(frame.columns)}"
            )
        frame = frame.copy()
        frame["layer"] = frame["layer"].astype(str)
        if "run" not in frame:
            frame["run"] = ""
        frame["run"] = frame["run"].astype(str)
        first = frame.drop_duplicates(["layer", "variable"])
        if "depth" not in first:
            first = first.assign(depth=np.arange(len(first)))
        if "kind" not in first:
            first = first.assign(kind="other")
        first = first.sort_values("depth", kind="stable")
        infos = [
            VariableInfo(str(r.layer), int(r.depth), str(r.variable), str(r.kind))
            for r in first.itertuples()
        ]
        keys = [(i.layer, i.variable) for i in infos]
        wide = frame.pivot_table(
            index=["run", "step"],
            columns=["layer", "variable"],
            values="grad_norm",
            aggfunc="first",
            dropna=False,
            sort=False,
        )
        order = frame.drop_duplicates(["run", "step"])[["run", "step"]]
        index = pd.MultiIndex.from_frame(order)
        wide = wide.reindex(index=index, columns=pd.MultiIndex.from_tuples(keys))

        def table(value: str) -> np.ndarray:
            if value not in frame:
                return np.full(wide.shape, np.nan, np.float32)
            pivot = frame.pivot_table(
                index=["run", "step"],
                columns=["layer", "variable"],
                values=value,
                aggfunc="first",
                dropna=False,
            )
            return pivot.reindex(index=index, columns=wide.columns).to_numpy(np.float32)

        per_step = frame.drop_duplicates(["run", "step"]).set_index(["run", "step"])
        per_step = per_step.reindex(index)
        records = cls(infos, run=",".join(dict.fromkeys(frame["run"])))
        grad = wide.to_numpy(np.float32)
        records.append(
            step=order["step"].to_numpy(),
            epoch=per_step["epoch"].to_numpy() if "epoch" in per_step else 0,
            grad_norm=grad,
            weight_norm=table("weight_norm"),
            global_norm=per_step["global_norm"].to_numpy()
            if "global_norm" in per_step
            else stats.combine_norms(np.nan_to_num(grad), axis=1),
            clipped_grad_norm=table("clipped_grad_norm")
            if "clipped_grad_norm" in frame
            else None,
        )
        return records
