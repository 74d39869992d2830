"""A run's learning curve and logged losses as a markdown table, read from its TensorBoard file.

    python experiments/losses.py runs/paper_tables/qtran_released__rho0.0__seed1
    python experiments/losses.py runs/paper_tables/qtran_tv_released__rho0.2__seed1 --bins 6 --tags losses/td_loss robust/eta_mean

One row per bin of env steps (--bins equal parts of the run): the mean of every logged value of each tag
inside the bin (charts/normalised_return per episode, losses/* every 100 updates), so a reader sees whether
the return rises and whether td / opt / nopt losses settle. Missing tags show as "-". Also the minutes of
training: the gaps between consecutive logged points, leaving out gaps over 10 minutes (a resumed run's pause;
the same rule as the sweep's train_seconds, experiments/sweep.py training_seconds).
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sweep (training_seconds)

DEFAULT_TAGS = [
    "charts/normalised_return",
    "losses/td_loss",
    "losses/opt_loss",
    "losses/nopt_loss",
    "losses/q_taken_mean",
    "losses/target_mean",
    "losses/grad_norm",
]


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]]
    """run folders (runs/<run name>) holding a TensorBoard events file"""
    bins: int = 6
    """equal parts of the run's env steps, one table row each"""
    tags: list[str] = field(default_factory=lambda: list(DEFAULT_TAGS))
    """scalar tags to show (absent ones are left out of the table)"""


def scalars(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """tag -> (env steps, values, wall times) of every scalar the run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (
            np.array([e.step for e in events]),
            np.array([e.value for e in events]),
            np.array([e.wall_time for e in events]),
        )
    return out


def table(run_dir: str, tags: list[str], bins: int) -> str:
    """The markdown table of one run (see the module docstring)."""
    data = scalars(run_dir)
    shown = [t for t in tags if t in data]
    if not shown:
        raise ValueError(f"{run_dir}: none of the tags {', '.join(tags)} was logged")
    last = max(int(data[t][0].max()) for t in shown)
    edges = np.linspace(0, last, bins + 1)
    from sweep import training_seconds  # gaps over PAUSE_SECONDS (a resumed run's pause) are no training

    minutes = training_seconds(sorted(np.concatenate([data[t][2] for t in shown]).tolist())) / 60
    lines = [
        f"{os.path.basename(os.path.normpath(run_dir))}: {last} env steps, {minutes:.1f} min of training (pauses > 10 min out)",
        "",
        "| env steps | " + " | ".join(shown) + " |",
        "|---" * (len(shown) + 1) + "|",
    ]
    for lo, hi in itertools.pairwise(edges):
        cells = []
        for t in shown:
            steps, values, _ = data[t]
            inside = values[(steps > lo) & (steps <= hi)] if lo > 0 else values[steps <= hi]
            cells.append(f"{inside.mean():.4g}" if inside.size else "-")
        lines.append(f"| {int(lo)}-{int(hi)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Args) -> int:
    if args.bins < 1:
        print(f"error: --bins must be >= 1 (got {args.bins})", file=sys.stderr)
        return 2
    for run in args.runs:
        if not os.path.isdir(run):
            print(f"error: no run folder '{run}'", file=sys.stderr)
            return 2
        print(table(run, args.tags, args.bins) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
