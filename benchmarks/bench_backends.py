"""kgrad's per-step cost on each Keras backend, against plain `model.fit` there.

    python benchmarks/bench_backends.py --backend jax          # or tensorflow, torch
    python benchmarks/bench_backends.py --backend jax --quick  # a smoke run
    python benchmarks/bench_backends.py --backend torch --jit-compile  # torch.compile

The model is the overhead benchmark's MLP (`workloads.py`: 20 ReLU layers of 128, 8,192
examples, batch 64, SGD). Every configuration trains one shared model (same variables,
optimizer and data), in rounds that alternate between the configurations; each round is
a `fit()` of `--epochs` epochs with the configuration's callbacks (the same callback
instances in every round, so that no round traces anew). A round's time per step is
divided by the plain round's of the same repetition, in wall time and in the process's
CPU time (steadier on a shared machine); the table gives the median and the range of
those ratios over `--rounds`. Two one-off costs are reported as well: the first
`fit()` of each configuration (its trace, on the warm model), and, for the logger, a
`fit()` after a plain one (a user's next `fit()` call), both against the plain fit.

Configurations: plain; `GradientNormLogger()` every step; `GradientNormLogger(
every_n_steps=10)`; `EarlyStopping()` (its `check_finite` reads one flag per step on the
host, so Keras runs its batch hooks synchronously); `GradientHealthMonitor(probe_data=
...)`; `GradientClipping("global_norm")`, also against the optimizer's own
`global_clipnorm` on a model of its own, in alternating fits. JAX compiles the step with XLA always
(`jit_compile="auto"`); `--jit-compile` compiles it with XLA on TensorFlow too, and
with `torch.compile` on torch (eager by default there).

On torch the script also counts the host reads per step beyond the plain step's
(`_torch_host_reads`), and sets no thread count: pass `OMP_NUM_THREADS` to pin it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default="jax")
    parser.add_argument("--rounds", type=int, default=8, help="repetitions (default 8)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs a round (default 2)")
    parser.add_argument(
        "--jit-compile", "--xla", dest="jit_compile", action="store_true",
        help="jit_compile=True: XLA on TensorFlow, torch.compile on torch",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny and short")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras

    import kgrad
    from workloads import WORKLOADS

    compiler = "torch.compile" if args.backend == "torch" else "XLA"
    label = f", {compiler}" if args.jit_compile else ""
    workload = WORKLOADS["mlp"]
    examples = 1024 if args.quick else workload.examples
    rounds = 2 if args.quick else args.rounds
    epochs = 1 if args.quick else args.epochs
    x, y = workload.data(examples)
    steps = epochs * (examples // workload.batch)

    def compiled(global_clipnorm: float | None = None) -> keras.Model:
        model = workload.build(0)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, global_clipnorm=global_clipnorm),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True if args.jit_compile else "auto",
        )
        return model

    configurations = {
        "plain": lambda: [],
        "GradientNormLogger()": lambda: [kgrad.GradientNormLogger()],
        "GradientNormLogger(every_n_steps=10)": lambda: [
            kgrad.GradientNormLogger(every_n_steps=10)
        ],
        "EarlyStopping()": lambda: [kgrad.EarlyStopping(monitor="loss", patience=100)],
    }
    probe = (x[:256], y[:256])
    configurations["GradientHealthMonitor(probe_data=...)"] = lambda: [
        kgrad.GradientHealthMonitor(probe_data=probe)
    ]
    configurations['GradientClipping("global_norm", 1.0)'] = lambda: [
        kgrad.GradientClipping("global_norm", threshold=1.0)
    ]

    model = compiled()
    callbacks = {name: make() for name, make in configurations.items()}

    cpu: dict[str, float] = {}

    def fit(name: str, rounds_epochs: int = epochs) -> float:
        """The wall time of a fit (its CPU time of the process goes into `cpu`)."""
        started, started_cpu = time.perf_counter(), time.process_time()
        model.fit(
            x, y, batch_size=workload.batch, epochs=rounds_epochs, verbose=0,
            shuffle=False, callbacks=callbacks[name],
        )
        cpu[name] = time.process_time() - started_cpu
        return time.perf_counter() - started

    print(
        f"backend {keras.backend.backend()}, MLP 20x128, {steps} steps a round, "
        f"{rounds} rounds{label}", flush=True
    )
    fit("plain")  # the plain trace, and warm caches
    plain_warm = fit("plain")
    first = {name: fit(name) / plain_warm for name in configurations if name != "plain"}
    # Once more each: a configuration traced before another made its state traces once
    # more (the step's state grew), as a user's second configuration on a model does.
    for name in configurations:
        fit(name)
    # A plain fit, then the logger's (kept) function again: what the next fit() pays.
    fit("plain")
    after_plain = fit("GradientNormLogger()") / fit("plain")

    ratios: dict[str, list[float]] = {name: [] for name in configurations if name != "plain"}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in ratios}
    order = list(configurations)
    for repetition in range(rounds):
        times, cpu_times = {}, {}
        for name in order if repetition % 2 == 0 else order[::-1]:
            times[name] = fit(name)
            cpu_times[name] = cpu[name]
        for name in ratios:
            ratios[name].append(times[name] / times["plain"])
            cpu_ratios[name].append(cpu_times[name] / cpu_times["plain"])
        print(f"  round {repetition + 1}/{rounds}: plain {1e3 * times['plain'] / steps:.3f} ms/step", flush=True)

    reads = _torch_host_reads(fit, configurations, steps) if args.backend == "torch" else {}

    # The optimizer's own global_clipnorm, on a model of its own, alternating.
    own = compiled(global_clipnorm=1.0)
    own.fit(x, y, batch_size=workload.batch, epochs=1, verbose=0)
    kgrad_times, own_times = [], []
    for _ in range(rounds):
        kgrad_times.append(fit('GradientClipping("global_norm", 1.0)'))
        started = time.perf_counter()
        own.fit(x, y, batch_size=workload.batch, epochs=epochs, verbose=0, shuffle=False)
        own_times.append(time.perf_counter() - started)
    clip_ratio = statistics.median(k / o for k, o in zip(kgrad_times, own_times))

    print(
        f"\n| configuration ({args.backend}{label}) | per step, wall "
        "(median, range) | per step, CPU time (median, range) | first fit() |"
    )
    print("|---|---|---|---|")
    for name, values in ratios.items():
        spent = cpu_ratios[name]
        print(
            f"| {name} | {statistics.median(values):.3f}x ({min(values):.2f}–"
            f"{max(values):.2f}) | {statistics.median(spent):.3f}x ({min(spent):.2f}–"
            f"{max(spent):.2f}) | {first[name]:.2f}x |"
        )
    print(f"\nthe logger's fit() right after a plain one: {after_plain:.3f}x a plain fit()")
    print(f'GradientClipping("global_norm") against SGD(global_clipnorm=1.0): {clip_ratio:.3f}x')
    print(f"plain: {1e3 * plain_warm / steps:.3f} ms per step (warm)")
    for name, count in reads.items():
        print(f"host reads per step beyond the plain step's, {name}: {count:g}")


def _torch_host_reads(fit, configurations, steps: int) -> dict[str, float]:
    """Per configuration, the reads of a tensor's value on the host per step
    (`aten._local_scalar_dense`: `.item()`, `bool(tensor)`; and `.tolist()`) beyond
    the plain step's, counted in one more fit of each (not timed): kgrad's step reads
    none (`kgrad.backend.torch`); `EarlyStopping`'s batch hook reads its flag."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    tolist = torch.Tensor.tolist
    for name in configurations:
        with CountReads() as counter:

            def counted(tensor, *args, _counter=counter):  # a read, not a dispatched op
                _counter.reads += 1
                return tolist(tensor, *args)

            torch.Tensor.tolist = counted
            try:
                fit(name)
            finally:
                torch.Tensor.tolist = tolist
        counts[name] = counter.reads
    return {
        name: (count - counts["plain"]) / steps
        for name, count in counts.items()
        if name != "plain"
    }


if __name__ == "__main__":
    main()
