"""Turn the sweep's per-run result JSON files into docs/results.md and its figures.

    python experiments/report.py docs/results/paper_tables            # -> docs/results.md (+ PNGs)

Per method and rho: our mean +- SE over seeds (SE = population std / sqrt(n), the paper's error bars;
n = 1 has no spread, shown as +-0) of each seed's 50-day mean normalised return, next to the published
number, and their difference in combined standard errors, (ours - paper) / sqrt(SE_ours^2 + SE_paper^2).
Figures: Figure 2 (climate bars, env_1..env_6) and training curves (mean +- SE band over seeds).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import envs  # noqa: E402

# Published Tables 1 (env_1) and 2 (env_6): mean, SE over 5 seeds (paper Sec. 5.1; ../shared notes)
PAPER = {
    "VDN non-robust": ((0.877, 0.012), (0.440, 0.040)), "QMIX non-robust": ((0.895, 0.008), (0.478, 0.052)),
    "QTRAN non-robust": ((0.816, 0.036), (0.654, 0.066)), "VDN GroupDR": ((0.624, 0.040), (0.624, 0.056)),
    "QMIX GroupDR": ((0.499, 0.022), (0.383, 0.053)), "QTRAN GroupDR": ((0.508, 0.048), (0.520, 0.049)),
    "VDN TV": ((0.898, 0.008), (0.627, 0.049)), "QMIX TV": ((0.916, 0.006), (0.520, 0.048)),
    "QTRAN TV": ((0.861, 0.006), (0.733, 0.026)), "VDN rho-contamination": ((0.869, 0.013), (0.551, 0.039)),
    "QMIX rho-contamination": ((0.911, 0.005), (0.500, 0.075)), "QTRAN rho-contamination": ((0.825, 0.028), (0.682, 0.026)),
}
CONFIGS = [f"env_{i}" for i in range(1, 7)]


@dataclass
class Args:
    results: tyro.conf.Positional[list[str]] = field(default_factory=lambda: [os.path.join(ROOT, "docs", "results")])
    """folders of per-run result JSON files written by experiments/sweep.py (one grid each)"""
    out: str = os.path.join(ROOT, "docs", "results.md")
    """the markdown report; its figures go to <out folder>/results/"""


def mean_se(x) -> tuple[float, float]:
    """Mean over seeds +- population std / sqrt(n) (as the paper)."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std() / np.sqrt(len(x)))


def z_score(ours: tuple[float, float], paper: tuple[float, float]) -> float:
    """Difference in combined standard errors."""
    return (ours[0] - paper[0]) / max(float(np.hypot(ours[1], paper[1])), 1e-12)


def load_runs(folders: list[str]) -> list[dict]:
    runs = []
    for folder in folders:
        if not os.path.isdir(folder):
            envs.fail(f"results: no such folder '{folder}'")
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    runs.append(json.load(f))
    return runs


def group(runs: list[dict]) -> dict:
    """(grid, method, rho) -> the runs of its seeds, in seed order."""
    groups = {}
    for r in sorted(runs, key=lambda r: (r["grid"], r["method"], r["rho"], r["seed"])):
        groups.setdefault((r["grid"], r["method"], r["rho"]), []).append(r)
    return groups


def cell(runs: list[dict], protocol: str, config: str):
    values = [r["normalised_return"][protocol][config] for r in runs if config in r["normalised_return"].get(protocol, {})]
    return mean_se(values) if values else None


def tables(groups: dict) -> list[str]:
    fmt = lambda v, n=2: "-" if not v else f"{v[0]:.3f} +- {v[1]:.3f}" if n > 1 else f"{v[0]:.3f}"  # noqa: E731
    lines = ["## Tables 1-2: our runs next to the published numbers", "",
             "Normalised return (Eq. 33), mean +- SE over seeds of each seed's mean over the 50 paper-tables days "
             "(`default_rng(11).integers(0, 200, 50)`). z = (ours - paper) / sqrt(SE_ours^2 + SE_paper^2); "
             "|z| <= 2 is within 2 combined SE. One seed has no SE: its value alone, no z.", "",
             "| method | rho | seeds | env_1 (Table 1) | paper | z | env_6 (Table 2) | paper | z | season env_1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (grid, method, rho), runs in groups.items():
        t1, t2, season = cell(runs, "paper-tables", "env_1"), cell(runs, "paper-tables", "env_6"), cell(runs, "season", "env_1")
        paper = PAPER.get(runs[0].get("paper", ""))
        p1, p2 = (paper if paper else (None, None))
        n = len(runs)
        z = lambda ours, p: f"{z_score(ours, p):+.1f}" if ours and p and n > 1 else "-"  # noqa: E731
        lines.append(f"| {method} | {rho:g} | {n} | {fmt(t1, n)} | {fmt(p1)} | {z(t1, p1)} | {fmt(t2, n)} | {fmt(p2)} "
                     f"| {z(t2, p2)} | {fmt(season, n)} |")
    lines += ["", "Paper column: " + ", ".join(sorted({f'{m} = {runs[0]["paper"]}' for (_, m, _), runs in groups.items()
                                                        if runs[0].get("paper")})) + "."]
    lines += ["", "## Figure 2: climatic shift (trained on env_1)", "",
              "| method | rho | " + " | ".join(CONFIGS) + " |", "|---|---|" + "---|" * len(CONFIGS)]
    for (grid, method, rho), runs in groups.items():
        lines.append(f"| {method} | {rho:g} | " + " | ".join(fmt(cell(runs, "climate", c), len(runs)) for c in CONFIGS) + " |")
    return lines


def plot(groups: dict, fig_dir: str) -> list[str]:
    """Figure 2 bars and training curves -> PNG paths (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(groups), 1)
    for k, ((grid, method, rho), runs) in enumerate(groups.items()):
        cells = [cell(runs, "climate", c) or (np.nan, 0.0) for c in CONFIGS]
        ax.bar(np.arange(len(CONFIGS)) + k * width, [c[0] for c in cells], width, yerr=[c[1] for c in cells],
               capsize=2, label=f"{method} rho={rho:g} (n={len(runs)})")
    ax.set_xticks(np.arange(len(CONFIGS)) + width * (len(groups) - 1) / 2, CONFIGS)
    ax.set_ylabel("normalised return (Eq. 33)")
    ax.set_title("Climatic shift (Figure 2): mean +- SE over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(fig_dir, "climate.png")))
    fig, ax = plt.subplots(figsize=(8, 4))
    for (grid, method, rho), runs in groups.items():
        n = min(len(r["curve"]["mean"]) for r in runs)
        if n == 0:
            continue
        curves = np.array([r["curve"]["mean"][:n] for r in runs])
        x = np.asarray(runs[0]["curve"]["episodes"][:n])
        m, se = curves.mean(0), curves.std(0) / np.sqrt(len(runs))
        ax.plot(x, m, label=f"{method} rho={rho:g} (n={len(runs)})")
        ax.fill_between(x, m - se, m + se, alpha=0.25)
    ax.set_xlabel("episode")
    ax.set_ylabel(f"training return ({runs[0]['curve']['tag'].split('/')[-1]}, {10}-episode means)")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], -3.0))
    ax.set_title("Training curves (exploring policy): mean +- SE over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(fig_dir, "curves.png")))
    plt.close("all")
    return paths


def _save(fig, path: str) -> str:
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    return path


def main(args: Args) -> str:
    runs = load_runs(args.results)
    if not runs:
        envs.fail(f"results: no result JSON files in {', '.join(args.results)}")
    groups = group(runs)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    figs = plot(groups, os.path.join(out_dir, "results"))
    lines = ["# Results", "", "Generated by `python experiments/report.py " + " ".join(os.path.relpath(f, ROOT) for f in args.results)
             + "` from the per-run JSON files the sweep wrote (`python experiments/sweep.py <grid>`); do not edit by hand.", ""]
    lines += tables(groups)
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in figs]
    lines += ["", "## Runs", "", "| run | commit | train min | command |", "|---|---|---|---|"]
    for runs_ in groups.values():
        for r in runs_:
            lines.append(f"| {r['run_name']} | {r['commit']} | {r['train_seconds'] / 60:.0f} | `{r['command']}` |")
    text = "\n".join(lines) + "\n"
    with open(args.out + ".tmp", "w") as f:
        f.write(text)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out} ({len(runs)} runs, {len(groups)} method/rho cells)")
    return text


if __name__ == "__main__":
    main(tyro.cli(Args))
