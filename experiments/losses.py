"""A run's learning curve and logged losses as a markdown table, read from its TensorBoard file.

    python experiments/losses.py runs/paper_tables/qtran_released__rho0.0__seed1
    python experiments/losses.py runs/paper_tables/qtran_tv_released__rho0.2__seed1 --bins 6 --tags losses/td_loss robust/eta_mean

One row per bin of env steps (--bins equal parts of the run): the mean of every logged value of each tag
inside the bin (charts/normalised_return per episode, losses/* every 100 updates), so a reader sees whether
the return rises and whether td / opt / nopt losses settle. Missing tags show as "-". Also the wall time
from the first to the last logged point.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import tyro

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
    wall = max(data[t][2].max() for t in shown) - min(data[t][2].min() for t in shown)
    lines = [
        f"{os.path.basename(os.path.normpath(run_dir))}: {last} env steps, {wall / 60:.1f} min first to last point",
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
