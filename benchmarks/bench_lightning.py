"""The peer: what PyTorch Lightning's gradient-norm recipe costs per step, on kgrad's MLP.

The model and data are those of `bench_overhead.py`'s MLP: 20 ReLU layers of 128, 64
features, 10 classes, 8,192 random examples, batch 64, SGD (lr 0.01), on the CPU build
of torch. Three LightningModules of the same weights alternate in this one process,
one epoch (128 steps) each per round, each in a fresh `Trainer`:

- `plain`: Lightning's own step, nothing logged;
- `grad_norm`: the recipe of Lightning's docs, `grad_norm(self, norm_type=2)` in
  `on_before_optimizer_step` (the norms computed, not logged);
- `grad_norm_log`: the same, with `self.log_dict(norms)` every step
  (`log_every_n_steps=1`, to a `CSVLogger`).

Each round's time per step (from the epoch's start to its end, as seen by a callback)
is divided by the plain one of the same round; the table reports medians and ranges.

Optional dependencies, not needed by kgrad or its tests (CPU build of torch; a plain
`pip install torch` may fetch a multi-GB CUDA build):

    python -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0 lightning numpy
    /work/bench-venv/bin/python benchmarks/bench_lightning.py --rounds 12
    /work/bench-venv/bin/python benchmarks/bench_lightning.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm

DEPTH, WIDTH, FEATURES, CLASSES, EXAMPLES, BATCH = 20, 128, 64, 10, 8192, 64
VARIANTS = ("plain", "grad_norm", "grad_norm_log")


class MLP(LightningModule):
    """The benchmark MLP; `variant` says what happens before each optimizer step."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        sizes = [FEATURES] + [WIDTH] * DEPTH
        layers: list[torch.nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, CLASSES))

    def training_step(self, batch, batch_index):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        if self.variant == "plain":
            return
        norms = grad_norm(self, norm_type=2)
        if self.variant == "grad_norm_log":
            self.log_dict(norms)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class EpochTimer(Callback):
    """Wall seconds of the last training epoch."""

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


def run_epoch(module: MLP, loader, folder: str) -> float:
    """One epoch of `module` in a fresh Trainer: seconds per step."""
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(folder, name=module.variant),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    return timer.seconds / len(loader)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="default 12")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 16 steps")
    args = parser.parse_args(argv)
    examples = 16 * BATCH if args.quick else EXAMPLES
    rounds = 2 if args.quick else args.rounds
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(examples, FEATURES)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, CLASSES, size=examples))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False
    )
    modules = {variant: MLP(variant) for variant in VARIANTS}
    for module in list(modules.values())[1:]:
        module.load_state_dict(modules["plain"].state_dict())
    seconds = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        for variant in VARIANTS:  # warm-up: threads, Lightning's first setup
            run_epoch(modules[variant], loader, folder)
        for round_ in range(rounds):
            order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                seconds[variant].append(run_epoch(modules[variant], loader, folder))
    import lightning

    print(
        f"\n{DEPTH}-layer {WIDTH}-wide ReLU MLP, {examples} examples, batch {BATCH}, "
        f"{rounds} alternating rounds of one epoch, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Lightning {lightning.__version__}\n"
    )
    print(f"{'configuration':<16}{'ms/step':>10}{'per-step ratio':>24}")
    print("-" * 50)
    for variant in VARIANTS:
        ratios = [t / p for t, p in zip(seconds[variant], seconds["plain"])]
        cell = f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"
        ms = 1e3 * statistics.median(seconds[variant])
        print(f"{variant:<16}{ms:>10.3f}{cell:>24}")


if __name__ == "__main__":
    main()
