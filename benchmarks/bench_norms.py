"""Formulations of the per-tensor norms in a train step, with and without XLA.

The logger computes one norm per gradient and per weight inside the traced train step.
This micro-benchmark takes the benchmark MLP of `bench_overhead.py` (20 ReLU layers of
128, 42 trainable tensors, batch 64), writes a plain TensorFlow train step for it
(forward pass, `GradientTape`, SGD update) and adds the 84 norms of its gradients and
weights, written into a buffer variable as the norm buffer does, in each formulation
below. Every variant is compiled once with `jit_compile=False` and once with
`jit_compile=True`; rounds of `--steps` steps alternate between the variants, and each
round's time is divided by the step without norms of the same compiler (`none`).

Formulations (what is stored per tensor):

- `l2_loss`: `tf.nn.l2_loss` (a half-square, one op; kgrad's formulation up to now;
  overflows for norms above ~1.8e19);
- `sum_square`: `reduce_sum(square(x))`;
- `dot`: `tensordot(flat, flat, 1)` (a dot product of the flattened tensor with itself);
- `norm`: `tf.norm(x)`;
- `segment`: one concatenated vector of all tensors, squared, summed per tensor
  (`unsorted_segment_sum`: XLA has no `SegmentSum`);
- `float64`: `l2_loss` of the tensor cast to float64, the root cast back (cannot
  overflow: `stats.tensor_norm_float64`);
- `two_scales`: `l2_loss(x)` and `l2_loss(x * 2**-64)`, the second used where the
  first overflows (`stats.safe_norm`);
- `max_scale`: divided by its largest magnitude before squaring (the textbook fix,
  LAPACK's `nrm2` in spirit);
- `fallback`: `l2_loss` of every tensor, then one `tf.cond` per step that recomputes
  them all with two scales only when one of them is not finite (`stats.safe_norms`).

Usage:

    python benchmarks/bench_norms.py                  # every variant, both compilers
    python benchmarks/bench_norms.py --quick          # a smoke run (seconds)
    python benchmarks/bench_norms.py --only none l2_loss two_scales --rounds 20
    python benchmarks/bench_norms.py --check          # overflow / inf / NaN of each
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kgrad import stats  # noqa: E402

DEPTH, WIDTH, FEATURES, CLASSES, BATCH = 20, 128, 64, 10, 64

Formulation = Callable[[list[tf.Tensor]], tf.Tensor]


def _each(function: Callable[[tf.Tensor], tf.Tensor]) -> Formulation:
    return lambda values: tf.stack([function(value) for value in values])


def _dot(value: tf.Tensor) -> tf.Tensor:
    flat = tf.reshape(value, [-1])
    return tf.tensordot(flat, flat, 1)


def _max_scale(value: tf.Tensor) -> tf.Tensor:
    largest = tf.reduce_max(tf.abs(value))
    usable = tf.logical_and(largest > 0, tf.math.is_finite(largest))
    scale = tf.where(usable, largest, 1.0)
    return scale * tf.sqrt(2.0 * tf.nn.l2_loss(value / scale))


def _segment(values: list[tf.Tensor]) -> tf.Tensor:
    flat = tf.concat([tf.reshape(value, [-1]) for value in values], 0)
    sizes = [int(np.prod(value.shape)) for value in values]
    ids = tf.constant(np.repeat(np.arange(len(values)), sizes), tf.int32)
    return tf.math.unsorted_segment_sum(tf.square(flat), ids, len(values))


FORMULATIONS: dict[str, Formulation | None] = {
    "none": None,
    "l2_loss": _each(tf.nn.l2_loss),
    "sum_square": _each(lambda value: tf.reduce_sum(tf.square(value))),
    "dot": _each(_dot),
    "norm": _each(tf.norm),
    "segment": _segment,
    "float64": _each(stats.tensor_norm_float64),
    "two_scales": _each(stats.safe_norm),
    "max_scale": _each(_max_scale),
    "fallback": stats.safe_norms,
}


class Step:
    """A plain TensorFlow train step of the MLP, with the norms of one formulation."""

    def __init__(self, formulation: Formulation | None, jit_compile: bool, seed: int):
        rng = np.random.default_rng(seed)
        sizes = [FEATURES] + [WIDTH] * DEPTH + [CLASSES]
        self.variables = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            kernel = rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)
            self.variables += [tf.Variable(kernel), tf.Variable(np.zeros(fan_out, "f4"))]
        self.buffer = tf.Variable(tf.zeros(2 * len(self.variables)))
        self.x = tf.constant(rng.normal(size=(BATCH, FEATURES)).astype(np.float32))
        self.y = tf.constant(rng.integers(0, CLASSES, BATCH))
        self.formulation = formulation
        self.function = tf.function(self._step, jit_compile=jit_compile)

    def _step(self) -> tf.Tensor:
        with tf.GradientTape() as tape:
            hidden = self.x
            for index in range(0, len(self.variables), 2):
                kernel, bias = self.variables[index : index + 2]
                hidden = tf.matmul(hidden, kernel) + bias
                if index < len(self.variables) - 2:
                    hidden = tf.nn.relu(hidden)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(self.y, hidden)
            )
        gradients = tape.gradient(loss, self.variables)
        if self.formulation is not None:
            weights = [variable.read_value() for variable in self.variables]
            self.buffer.assign(self.formulation(gradients + weights))
        for variable, gradient in zip(self.variables, gradients):
            variable.assign_sub(1e-3 * gradient)
        return loss

    def seconds_per_step(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.function()
        loss.numpy()
        return (time.perf_counter() - start) / steps


def check() -> None:
    """Prints each formulation's norm of an overflowing, an inf and a NaN tensor."""
    big = np.full((128, 128), 1e21 / 128, np.float32)  # norm 1e21: representable
    cases = {"norm 1e21": big, "inf entry": big.copy(), "NaN entry": big.copy()}
    cases["inf entry"][0, 0], cases["NaN entry"][0, 0] = np.inf, np.nan
    print(f"{'formulation':<12}" + "".join(f"{case:>14}" for case in cases))
    for name, formulation in FORMULATIONS.items():
        if formulation is None:
            continue
        values = [
            formulation([tf.constant(case)])[0].numpy() for case in cases.values()
        ]
        if name in ("l2_loss", "sum_square", "dot", "segment"):  # squares
            values = [np.sqrt(np.float64(v) * (2 if name == "l2_loss" else 1)) for v in values]
        print(f"{name:<12}" + "".join(f"{float(v):>14.6g}" for v in values))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="default 12")
    parser.add_argument("--steps", type=int, default=200, help="per round (default 200)")
    parser.add_argument("--only", nargs="*", default=None, help=str(list(FORMULATIONS)))
    parser.add_argument("--xla", choices=("both", "on", "off"), default="both")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20 steps")
    parser.add_argument("--check", action="store_true", help="overflow, inf, NaN")
    args = parser.parse_args(argv)
    if args.check:
        check()
        return
    if args.quick:
        args.rounds, args.steps = 2, 20
    names = args.only or list(FORMULATIONS)
    names = ["none", *[name for name in names if name != "none"]]
    compilers = {"both": (False, True), "on": (True,), "off": (False,)}[args.xla]
    steps = {
        (name, jit): Step(FORMULATIONS[name], jit, seed=0)
        for jit in compilers
        for name in names
    }
    for step in steps.values():
        step.seconds_per_step(5)  # traces and compiles
    seconds = {key: [] for key in steps}
    for round_ in range(args.rounds):
        keys = list(steps) if round_ % 2 == 0 else list(steps)[::-1]
        for key in keys:
            seconds[key].append(steps[key].seconds_per_step(args.steps))
    print(
        f"\nMLP {DEPTH}x{WIDTH}, batch {BATCH}, {len(steps[names[0], compilers[0]].variables)}"
        f" tensors (84 norms a step), {args.rounds} alternating rounds of {args.steps}"
        f" steps, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}\n"
    )
    header = f"{'formulation':<12}"
    for jit in compilers:
        label = "XLA" if jit else "no XLA"
        header += f"{label + ' µs/step':>18}{label + ' ratio':>22}"
    print(header)
    print("-" * len(header))
    for name in names:
        line = f"{name:<12}"
        for jit in compilers:
            ratios = [
                t / p for t, p in zip(seconds[name, jit], seconds["none", jit])
            ]
            line += f"{1e6 * statistics.median(seconds[name, jit]):>18.0f}"
            cell = f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"
            line += f"{cell:>22}"
        print(line)


if __name__ == "__main__":
    main()
