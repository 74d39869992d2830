"""Turn a StarCraft grid's result JSON files (sweep.py, protocols = ["starcraft"]) into a page and its figures.

    python experiments/starcraft_report.py docs/results/starcraft_learning     # -> docs/results_starcraft_learning.md

Each run's JSON holds the test win rates its script logged while training (Sec. 5.2: every --eval-every env
steps, 32 greedy episodes with clean observations and the same 32 with N(0, 0.75^2) noise on every enemy's
relative position). Per method and rho: the seeds, the env steps reached, the last round's clean and noisy win
rates (mean +- SE over seeds, SE = population std / sqrt(n) as in the paper's error bars; n = 1 shows +-0) and
the best clean win rate along the curve. Figure 3: the win rates against env steps (mean +- SE band, over the
steps every seed reached). Figure 4: the last noisy win rate of each rho > 0 minus that of rho = 0 of the same
method, with the stratified-bootstrap 95% interval over seeds (experiments/stats.py) once both have 2+ seeds.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import stats
from report import mean_se  # mean over seeds +- population std / sqrt(n), as the paper and docs/results.md

import envs


@dataclass
class Args:
    results: tyro.conf.Positional[str]
    """folder of one StarCraft grid's result JSON files (docs/results/<grid>)"""
    out: str = ""
    """the markdown page (default: docs/results_<grid>.md); its figure goes to docs/results/<grid>_curves.png"""
    last_rounds: int = 10
    """the table's smoothed columns: each seed's mean over its last this-many evaluation rounds (10 = the last 100k steps)"""


def load(folder: str) -> dict[tuple[str, float], list[dict]]:
    """(method, rho) -> the runs with a StarCraft curve, in seed order."""
    if not os.path.isdir(folder):
        envs.fail(f"results: no such folder '{folder}'")
    groups: dict[tuple[str, float], list[dict]] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                run = json.load(f)
            if "starcraft" in run:
                groups.setdefault((run["method"], float(run["rho"])), []).append(run)
    if not groups:
        envs.fail(f"results: no StarCraft result JSON files in '{folder}' (a grid with [eval] protocols = [\"starcraft\"])")
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in sorted(groups.items())}


def curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(env steps, mean, SE) of one win-rate curve over seeds, on the evaluation rounds every seed reached."""
    n = min(len(r["starcraft"]["env_steps"]) for r in runs)
    values = np.array([r["starcraft"][key][:n] for r in runs], dtype=float)
    return np.asarray(runs[0]["starcraft"]["env_steps"][:n]), values.mean(0), values.std(0) / np.sqrt(len(runs))


def rows(groups: dict, last_rounds: int = 10) -> list[dict]:
    """Per method and rho: the last round's win rates (the paper's "final"), each seed's mean over its last
    `last_rounds` rounds (one round of 32 episodes is a noisy estimate: measured on SMAX 3s_vs_5z, consecutive
    rounds of one QMIX run differ by up to 0.44), and the best clean round; mean +- SE over seeds."""
    out = []
    for (method, rho), runs in groups.items():
        finals = [r["starcraft"]["final"] for r in runs]
        tail = {
            k: [float(np.mean(r["starcraft"][k][-last_rounds:])) for r in runs] for k in ("win_rate_clean", "win_rate_noisy")
        }
        out.append(
            {
                "method": method,
                "rho": rho,
                "seeds": [r["seed"] for r in runs],
                "steps": min(f["step"] for f in finals),
                "clean": mean_se([f["win_rate_clean"] for f in finals]),
                "noisy": mean_se([f["win_rate_noisy"] for f in finals]),
                "tail_clean": mean_se(tail["win_rate_clean"]),
                "tail_noisy": mean_se(tail["win_rate_noisy"]),
                "best_clean": mean_se([max(r["starcraft"]["win_rate_clean"]) for r in runs]),
            }
        )
    return out


def gains(groups: dict) -> list[dict]:
    """Figure 4: per method and rho > 0, last noisy win rate minus rho = 0's, with a 95% CI when both have 2+ seeds."""
    out = []
    for (method, rho), runs in groups.items():
        base = groups.get((method, 0.0))
        if rho == 0 or base is None:
            continue
        x = [r["starcraft"]["final"]["win_rate_noisy"] for r in runs]
        y = [r["starcraft"]["final"]["win_rate_noisy"] for r in base]
        diff, low, high = stats.bootstrap_diff_ci(x, y) if min(len(x), len(y)) >= 2 else (np.mean(x) - np.mean(y), None, None)
        out.append({"method": method, "rho": rho, "n": (len(x), len(y)), "diff": float(diff), "low": low, "high": high})
    return out


def plot(groups: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("win_rate_clean", "win_rate_noisy"), ("clean observations", "noisy observations")):
        for (method, rho), runs in groups.items():
            steps, m, se = curve(runs, key)
            ax.plot(steps, m, label=f"{method} rho={rho:g} (n={len(runs)})")
            ax.fill_between(steps, m - se, m + se, alpha=0.25)
        ax.set_xlabel("env steps")
        ax.set_title(f"test win rate, {title} (Figure 3)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("win rate over 32 greedy episodes, mean +- SE")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path


def main(args: Args) -> str:
    folder = os.path.abspath(args.results)
    grid = os.path.basename(folder.rstrip("/"))
    if args.last_rounds < 1:
        envs.fail(f"--last-rounds must be a positive number of evaluation rounds (got {args.last_rounds})")
    groups = load(folder)
    docs = os.path.dirname(os.path.dirname(folder))  # docs/results/<grid> -> docs
    out = args.out or os.path.join(docs, f"results_{grid}.md")
    fig = plot(groups, os.path.join(docs, "results", f"{grid}_curves.png"))
    lines = [
        f"# StarCraft results: {grid}",
        "",
        (
            f"Generated by `python experiments/starcraft_report.py {os.path.relpath(folder, ROOT)}` from the per-run "
            f"JSON files "
            f"of `python experiments/sweep.py experiments/{grid}.toml`; do not edit by hand. Test win rates over 32 greedy "
            "episodes, clean and with N(0, 0.75^2) noise on every enemy's relative position (Sec. 5.2); mean +- SE over seeds."
        ),
        "",
        (
            f"Last: the last evaluation round (the paper's final win rate); last {args.last_rounds}: each seed's mean over "
            f"its last {args.last_rounds} rounds, then over seeds; best: each seed's best clean round."
        ),
        "",
        (
            f"| method | rho | seeds | env steps | last clean win rate | last noisy win rate | clean, last {args.last_rounds} "
            f"| noisy, last {args.last_rounds} | best clean win rate |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(groups, args.last_rounds):
        cells = [f"{r[k][0]:.3f} +- {r[k][1]:.3f}" for k in ("clean", "noisy", "tail_clean", "tail_noisy", "best_clean")]
        lines.append(f"| {r['method']} | {r['rho']:g} | {len(r['seeds'])} | {r['steps']:,} | " + " | ".join(cells) + " |")
    figure4 = gains(groups)
    if figure4:
        lines += [
            "",
            "Figure 4: last noisy win rate, rho - (rho = 0), with a stratified-bootstrap 95% interval over seeds.",
            "",
            "| method | rho | seeds (rho, rho = 0) | difference | 95% CI |",
            "|---|---|---|---|---|",
        ]
        for g in figure4:
            ci = f"[{g['low']:+.3f}, {g['high']:+.3f}]" if g["low"] is not None else "needs 2+ seeds each"
            lines.append(f"| {g['method']} | {g['rho']:g} | {g['n'][0]}, {g['n'][1]} | {g['diff']:+.3f} | {ci} |")
    lines += ["", f"![{os.path.basename(fig)}]({os.path.relpath(fig, os.path.dirname(out))})", "", "## Runs", ""]
    lines += ["| run | commit | train min | machine | command |", "|---|---|---|---|---|"]
    for runs in groups.values():
        for r in runs:
            m = "; ".join(f"{x['cpu']}, torch {x['torch']}" for x in r.get("machine", [])) or "-"
            lines.append(f"| {r['run_name']} | {r['commit']} | {r['train_seconds'] / 60:.0f} | {m} | `{r['command']}` |")
    text = "\n".join(lines) + "\n"
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.replace(out + ".tmp", out)
    print(f"wrote {out} and {fig} ({sum(len(v) for v in groups.values())} runs)")
    return text


if __name__ == "__main__":
    main(tyro.cli(Args))
