"""Turn the sweep's per-run result JSON files into docs/results.md and its figures.

    python experiments/report.py docs/results/paper_tables            # -> docs/results.md (+ PNGs)

Per method and rho: our mean +- SE over seeds (SE = population std / sqrt(n), the paper's error bars;
n = 1 has no spread, shown as +-0) of each seed's 50-day mean normalised return, next to the published
number, and their difference in combined standard errors, (ours - paper) / sqrt(SE_ours^2 + SE_paper^2).
Claims (issue 15 item 4): per factorisation and robust set, robust - non-robust (the released-configuration
runs of the two published rows) on env_6, env_1 and season, with a stratified-bootstrap 95% CI over seeds and
the probability of improvement (experiments/stats.py), next to the paper's difference and a verdict.
Single-factor ablations: a method `<base>_<suffix>` against `<base>` (same grid and rho), with the same statistics.
Figures: Figure 2 (climate, env_1..env_6, and season; one panel per factorisation) and training curves
(mean +- SE band over seeds). Also <out folder>/results/marl_eval.json: every run in marl-eval's JSON format.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats

import envs

# Published Tables 1 (env_1) and 2 (env_6): mean, SE over 5 seeds (paper Sec. 5.1; ../shared notes)
PAPER = {
    "VDN non-robust": ((0.877, 0.012), (0.440, 0.040)),
    "QMIX non-robust": ((0.895, 0.008), (0.478, 0.052)),
    "QTRAN non-robust": ((0.816, 0.036), (0.654, 0.066)),
    "VDN GroupDR": ((0.624, 0.040), (0.624, 0.056)),
    "QMIX GroupDR": ((0.499, 0.022), (0.383, 0.053)),
    "QTRAN GroupDR": ((0.508, 0.048), (0.520, 0.049)),
    "VDN TV": ((0.898, 0.008), (0.627, 0.049)),
    "QMIX TV": ((0.916, 0.006), (0.520, 0.048)),
    "QTRAN TV": ((0.861, 0.006), (0.733, 0.026)),
    "VDN rho-contamination": ((0.869, 0.013), (0.551, 0.039)),
    "QMIX rho-contamination": ((0.911, 0.005), (0.500, 0.075)),
    "QTRAN rho-contamination": ((0.825, 0.028), (0.682, 0.026)),
}
CONFIGS = [f"env_{i}" for i in range(1, 7)]
FACTORISATIONS = ("VDN", "QMIX", "QTRAN")
ROBUST_SETS = ("rho-contamination", "TV", "GroupDR")
# The rho behind each published row (paper Sec. 5.1); GroupDR has none. "Non-robust" = rho-contamination at rho 0.
PAPER_RHO = {
    "non-robust": {"VDN": 0.0, "QMIX": 0.0, "QTRAN": 0.0},
    "rho-contamination": {"VDN": 0.008, "QMIX": 0.012, "QTRAN": 0.02},
    "TV": {"VDN": 0.5, "QMIX": 0.2, "QTRAN": 0.2},
}
# (label, protocol, config, index of the published table in PAPER: 0 = Table 1, 1 = Table 2)
CLAIM_EVALS = (
    ("env_6 (Table 2)", "paper-tables", "env_6", 1),
    ("env_1, days 0-199 (Table 1 as published)", "paper-tables", "env_1", 0),
    ("season: env_1, days 200-364 (Table 1 as described)", "season", "env_1", 0),
)
# (label, protocol, config) of the single-factor ablations table
ABLATION_EVALS = (
    ("env_1 (paper-tables)", "paper-tables", "env_1"),
    ("env_6 (paper-tables)", "paper-tables", "env_6"),
    ("season env_1", "season", "env_1"),
)
MARL_EVAL = "marl_eval.json"  # written next to the figures; never read as a run
RHO_GRID = os.path.join("released", "rho_grid.json")  # experiments/rho_selection.py --out, under <out folder>/results/
REPRODUCIBILITY = (
    "**What agreement to expect when you rerun a command.** On one machine the same command gives the same numbers "
    "bit for bit (same code, CPU model, torch version and thread count; every script seeds all its RNGs and runs "
    "deterministic CPU kernels). Across CPU types it does not: fused.py's C++ kernels are compiled for the CPU they run "
    "on (`-march=native -ffast-math`) and torch picks its vectorised kernels by what the processor offers, so the last "
    "bits of a float can differ, one action eventually flips, and from there the run follows another trajectory. "
    "Measured: the README main job (`qmix_tv_paper`, seed 1), rerun with the same code on another CPU type, matched "
    "the committed run bit for bit for its first 120 episodes and ended at env_6 -0.390 where the committed JSON has "
    "-0.238. So a rerun on another machine agrees with these tables within the spread over seeds (the SE columns), "
    "not in the digits. The Runs table gives the machine of each run where the sweep recorded it (runs started "
    "before it did show -)."
)


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
            if name.endswith(".json") and name != MARL_EVAL:
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
    fmt = lambda v, n=2: "-" if not v else f"{v[0]:.3f} +- {v[1]:.3f}" if n > 1 else f"{v[0]:.3f}"
    lines = [
        "## Tables 1-2: our runs next to the published numbers",
        "",
        (
            "Normalised return (Eq. 33), mean +- SE over seeds of each seed's mean over the 50 paper-tables days "
            "(`default_rng(11).integers(0, 200, 50)`). z = (ours - paper) / sqrt(SE_ours^2 + SE_paper^2); "
            "|z| <= 2 is within 2 combined SE. One seed has no SE: its value alone, no z."
        ),
        "",
        "| method | rho | seeds | env_1 (Table 1) | paper | z | env_6 (Table 2) | paper | z | season env_1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (grid, method, rho), runs in groups.items():
        t1, t2, season = (
            cell(runs, "paper-tables", "env_1"),
            cell(runs, "paper-tables", "env_6"),
            cell(runs, "season", "env_1"),
        )
        paper = PAPER.get(runs[0].get("paper", ""))
        p1, p2 = paper if paper else (None, None)
        n = len(runs)
        z = lambda ours, p, n=n: f"{z_score(ours, p):+.1f}" if ours and p and n > 1 else "-"
        lines.append(
            f"| {method} | {rho:g} | {n} | {fmt(t1, n)} | {fmt(p1)} | {z(t1, p1)} | {fmt(t2, n)} | {fmt(p2)} "
            f"| {z(t2, p2)} | {fmt(season, n)} |"
        )
    lines += [
        "",
        "Paper column: "
        + ", ".join(sorted({f"{m} = {runs[0]['paper']}" for (_, m, _), runs in groups.items() if runs[0].get("paper")}))
        + ".",
    ]
    lines += [""] + claims_table(claims(groups))
    ablation_lines = ablation_table(ablations(groups))
    lines += [""] + ablation_lines if ablation_lines else []
    lines += [
        "",
        "## Figure 2: climatic shift (trained on env_1)",
        "",
        (
            "Each method's greedy policy on the paper-tables days of every climate (env_1 = training), and `season`: "
            "env_1 on 50 days of the part of the year never trained on (`default_rng(11).integers(200, 365, 50)`; "
            "eval.py's `season` protocol, our realisation of the paper's seasonal shift). Mean +- SE over seeds."
        ),
        "",
        "| method | rho | " + " | ".join(CONFIGS) + " | season env_1 |",
        "|---|---|" + "---|" * (len(CONFIGS) + 1),
    ]
    for (grid, method, rho), runs in groups.items():
        lines.append(
            f"| {method} | {rho:g} | "
            + " | ".join(fmt(cell(runs, "climate", c), len(runs)) for c in CONFIGS)
            + f" | {fmt(cell(runs, 'season', 'env_1'), len(runs))} |"
        )
    return lines


def factorisation(runs: list[dict]) -> str:
    """VDN, QMIX or QTRAN, from the script's name (algos/robust_qmix_tv.py, algos/groupdr_vdn.py, ...)."""
    name = os.path.basename(runs[0].get("script", "")) + " " + runs[0].get("method", "")
    return next((f for f in FACTORISATIONS if f.lower() in name.lower()), "other")


def released_cell(groups: dict, row: str):
    """The runs that stand for a published row: a released-configuration method (name ending in `_released`)
    whose `paper` field names the row, at the row's published rho (any rho for GroupDR); the one with most seeds
    if several. None if there is none."""
    fact, kind = row.split(" ", 1)
    rho = PAPER_RHO.get(kind, {}).get(fact)
    found = [
        (key, runs)
        for key, runs in groups.items()
        if key[1].endswith("_released") and runs[0].get("paper") == row and (rho is None or abs(key[2] - rho) < 1e-12)
    ]
    return max(found, key=lambda kr: len(kr[1]), default=None)


def values(runs: list[dict], protocol: str, config: str) -> list[float]:
    return [r["normalised_return"][protocol][config] for r in runs if config in r["normalised_return"].get(protocol, {})]


def claims(groups: dict) -> list[dict]:
    """Robust - non-robust for every factorisation, robust set and claim evaluation (CLAIM_EVALS)."""
    out = []
    for fact in FACTORISATIONS:
        base_row = f"{fact} non-robust"
        base = released_cell(groups, base_row)
        for kind in ROBUST_SETS:
            row = f"{fact} {kind}"
            robust = released_cell(groups, row)
            for label, protocol, config, table in CLAIM_EVALS:
                (pr, pr_se), (pb, pb_se) = PAPER[row][table], PAPER[base_row][table]
                x = values(robust[1], protocol, config) if robust else []
                y = values(base[1], protocol, config) if base else []
                c = {
                    "claim": f"{row} > {base_row}",
                    "eval": label,
                    "paper": (pr - pb, float(np.hypot(pr_se, pb_se))),
                    "robust": robust[0] if robust else None,
                    "base": base[0] if base else None,
                    "n": (len(x), len(y)),
                }
                if len(x) >= 2 and len(y) >= 2:
                    c["ours"] = stats.bootstrap_diff_ci(x, y)
                    c["poi"] = stats.probability_of_improvement(x, y)
                    c["verdict"] = stats.verdict(c["paper"][0], *c["ours"][1:])
                out.append(c)
    return out


def claims_table(rows: list[dict]) -> list[str]:
    lines = [
        "## The claims: robust - non-robust, tested",
        "",
        (
            "For each factorisation and robust set, the difference in normalised return robust - non-robust between the "
            "released-configuration runs of the two published rows (method names ending in `_released` whose `paper` "
            "field names the row, at the published rho: rho-contamination VDN 0.008, QMIX 0.012, QTRAN 0.02; TV VDN 0.5, "
            "QMIX 0.2, QTRAN 0.2; non-robust = rho-contamination at rho 0). "
            "**Paper**: the difference of the two published cells +- its SE, sqrt(SE_robust^2 + SE_non-robust^2). "
            "**Ours**: the difference of the two means over seeds with a 95% stratified bootstrap interval (as rliable / "
            "marl-eval: 50,000 replicates, each resampling the robust seeds and, independently, the non-robust seeds "
            "with replacement; percentile interval; fixed RNG seed, experiments/stats.py). "
            "**P(robust > non-robust)**: the probability of improvement over all (robust run, non-robust run) pairs, ties "
            "1/2 (Mann-Whitney U / (n_r n_nr)). **Verdict**: *reproduced* = our interval excludes 0 on the side of the "
            "paper's difference; *not reproduced* = it excludes 0 on the other side; *not significant either way* = 0 is "
            "inside it. Fewer than 2 seeds on either side: n/a (robust vs non-robust seeds). "
            "The paper reports its seasonal shift (Experiment 2) in Table 1, but the published Table 1 numbers were "
            "evaluated on the training days 0-199 (`../shared/notes/paper-facts.md`): the env_1 rows compare with those "
            "numbers, the season rows test the claim on days never trained on, against the same paper difference."
        ),
        "",
        ("| claim | evaluated on | paper | ours [95% CI] | seeds | P(robust > non-robust) | paper's inside ours | verdict |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        (p_diff, pse), (nr, nb) = c["paper"], c["n"]
        if "ours" in c:
            d, lo, hi = c["ours"]
            ours, poi, verdict = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]", f"{c['poi']:.2f}", c["verdict"]
            inside = "yes" if lo <= p_diff <= hi else "no"
        else:
            ours, poi, inside, verdict = f"n/a ({nr} vs {nb} seeds)", "-", "-", "-"
        lines.append(
            f"| {c['claim']} | {c['eval']} | {p_diff:+.3f} +- {pse:.3f} | {ours} | {nr} vs {nb} | {poi} | {inside} "
            f"| {verdict} |"
        )
    used = sorted({f"{k[1]} (rho {k[2]:g})" for c in rows for k in (c["robust"], c["base"]) if k})
    lines += [
        "",
        "Runs compared: " + (", ".join(used) if used else "none yet") + ". Reproduce: "
        "`python experiments/sweep.py experiments/paper_tables.toml`, then "
        "`python experiments/report.py docs/results/paper_tables`.",
    ]
    return lines


def ablations(groups: dict) -> list[dict]:
    """Single-factor ablations: every method named `<base>_<suffix>` whose `<base>` is another method of the same grid
    at the same rho (the longest such base), against it: the flags it adds, and per ABLATION_EVALS the difference
    ablation - base over seeds with its 95% stratified bootstrap interval and the probability of improvement."""
    out = []
    for (grid, method, rho), runs in groups.items():
        bases = [k for k in groups if k[0] == grid and abs(k[2] - rho) < 1e-12 and method.startswith(k[1] + "_")]
        if not bases:
            continue
        base_key = max(bases, key=lambda k: len(k[1]))
        base = groups[base_key]
        base_flags = set(base[0].get("flags", []))
        row = {
            "method": method,
            "base": base_key[1],
            "rho": rho,
            "added": [f for f in runs[0].get("flags", []) if f not in base_flags],
            "n": (len(runs), len(base)),
            "evals": [],
        }
        for label, protocol, config in ABLATION_EVALS:
            x, y = values(runs, protocol, config), values(base, protocol, config)
            row["evals"].append(
                (label, stats.bootstrap_diff_ci(x, y), stats.probability_of_improvement(x, y))
                if len(x) >= 2 and len(y) >= 2
                else (label, None, None)
            )
        out.append(row)
    return out


def ablation_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Single-factor ablations",
        "",
        (
            "A method named `<base>_<suffix>` is `<base>` (column 2) plus the flags added (column 3), same grid, same rho. "
            "Each cell: ablation - base, difference of the means over seeds with its 95% stratified bootstrap interval "
            "(as in the claims table), and P(ablation > base), the probability of improvement. Fewer than 2 seeds on "
            "either side: n/a."
        ),
        "",
        "| ablation | adds to | flags added | rho | seeds | " + " | ".join(label for label, _, _ in ABLATION_EVALS) + " |",
        "|---|---|---|---|---|" + "---|" * len(ABLATION_EVALS),
    ]
    for r in rows:
        cells = [
            "n/a" if ci is None else f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}], P {poi:.2f}" for _, ci, poi in r["evals"]
        ]
        added = "`" + " ".join(r["added"]) + "`" if r["added"] else "-"
        lines.append(
            f"| {r['method']} | {r['base']} | {added} | {r['rho']:g} | {r['n'][0]} vs {r['n'][1]} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def marl_eval(groups: dict) -> dict:
    """Every run in the JSON format marl-eval reads: environment -> task -> algorithm -> run -> step -> metrics.

    environment `building`: tasks env_1..env_6 (the climate protocol on the paper-tables days; env_1 and env_6 are
    Tables 1 and 2) and `season` (env_1 on the season days); one step (`step_0`, at the run's last env step) and
    `absolute_metrics`, both the final greedy policy's 50-day mean normalised return (a one-element list).
    environment `building_training`: task env_1, one step per training-curve point (the exploring policy's
    10-episode mean normalised return at that env step), `absolute_metrics` = the greedy paper-tables env_1 value.
    Algorithm = `<method>_rho<rho>` (lower case, no commas), prefixed `<grid>/` when several grids are loaded;
    run = `seed_<seed>` (as marl-eval's JsonLogger names runs).
    """
    metric = "normalised_return"
    several = len({key[0] for key in groups}) > 1
    data = {"building": {}, "building_training": {}}
    for (grid, method, rho), runs in groups.items():
        algo = (f"{grid}/" if several else "") + f"{method}_rho{rho:g}".lower()
        for r in runs:
            steps = r.get("curve", {}).get("env_steps", [])
            last = int(steps[-1]) if steps else 0
            results = r["normalised_return"]
            tasks = {c: results["climate"][c] for c in CONFIGS if c in results.get("climate", {})}
            if "env_1" in results.get("season", {}):
                tasks["season"] = results["season"]["env_1"]
            for task, v in tasks.items():
                data["building"].setdefault(task, {}).setdefault(algo, {})[f"seed_{r['seed']}"] = {
                    "step_0": {"step_count": last, metric: [float(v)]},
                    "absolute_metrics": {metric: [float(v)]},
                }
            if steps and "env_1" in results.get("paper-tables", {}):
                curve = zip(steps, r["curve"]["mean"], strict=True)
                run = {f"step_{i}": {"step_count": int(s), metric: [float(m)]} for i, (s, m) in enumerate(curve)}
                run["absolute_metrics"] = {metric: [float(results["paper-tables"]["env_1"])]}
                data["building_training"].setdefault("env_1", {}).setdefault(algo, {})[f"seed_{r['seed']}"] = run
    return {env: tasks for env, tasks in data.items() if tasks}


def machine(run: dict) -> str:
    """The machine(s) a run was trained on (sweep.py's `machine` field), '-' where it was not recorded."""
    found = run.get("machine") or []
    return (
        " + ".join(f"{m.get('cpu', '?')}, torch {m.get('torch', '?')}, {m.get('torch_threads', '?')} thread(s)" for m in found)
        or "-"
    )


def plot(groups: dict, fig_dir: str) -> list[str]:
    """Figure 2 (climate env_1..env_6 and season) and training curves, one panel per factorisation -> PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    panels = {}
    for key, runs in groups.items():
        panels.setdefault(factorisation(runs), []).append((key, runs))
    names = [f for f in (*FACTORISATIONS, "other") if f in panels]
    paths = []
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    x = np.arange(len(CONFIGS) + 1)
    for ax, name in zip(axes[0], names, strict=True):
        for k, ((_, method, rho), runs) in enumerate(panels[name]):
            cells = [cell(runs, "climate", c) or (np.nan, 0.0) for c in CONFIGS]
            cells.append(cell(runs, "season", "env_1") or (np.nan, 0.0))
            m, se = np.array([c[0] for c in cells]), np.array([c[1] for c in cells])
            dx = 0.06 * (k - (len(panels[name]) - 1) / 2)  # side by side, so the error bars do not hide each other
            line = ax.errorbar(
                x[:-1] + dx, m[:-1], yerr=se[:-1], marker="o", ms=3, capsize=2, label=f"{method} rho={rho:g} (n={len(runs)})"
            )
            ax.errorbar(x[-1:] + dx, m[-1:], yerr=se[-1:], marker="s", ms=4, capsize=2, color=line[0].get_color())
        ax.axvline(len(CONFIGS) - 0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [*CONFIGS, "season\n(env_1)"])
        ax.set_ylim(bottom=max(ax.get_ylim()[0], -1.0))
        ax.set_title(f"{name}: climatic shift (Figure 2) and season")
        ax.set_ylabel("normalised return (Eq. 33), mean +- SE")
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(fig_dir, "climate.png")))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        tag = "normalised_return"
        for (_, method, rho), runs in panels[name]:
            n = min(len(r["curve"]["mean"]) for r in runs)
            if n == 0:
                continue
            tag = runs[0]["curve"]["tag"].split("/")[-1]
            curves = np.array([r["curve"]["mean"][:n] for r in runs])
            ep = np.asarray(runs[0]["curve"]["episodes"][:n])
            m, se = curves.mean(0), curves.std(0) / np.sqrt(len(runs))
            ax.plot(ep, m, label=f"{method} rho={rho:g} (n={len(runs)})")
            ax.fill_between(ep, m - se, m + se, alpha=0.25)
        ax.set_xlabel("episode")
        ax.set_ylabel(f"training return ({tag}, 10-episode means)")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], -3.0))
        ax.set_title(f"{name}: training curves (exploring policy), mean +- SE")
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(fig_dir, "curves.png")))
    plt.close("all")
    return paths


def _save(fig, path: str) -> str:
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    return path


def _cell(env6: dict, rho) -> str:
    return "{:.3f} +- {:.3f}".format(*env6[str(rho)]) if str(rho) in env6 else "-"


def rho_grid_section(path: str) -> list[str]:
    """The authors' released rho grids read by experiments/rho_selection.py: which rho the paper's rule picks."""
    with open(path) as f:
        grid = json.load(f)
    lines = [
        "## How the published rho was picked: the authors' released rho grids",
        "",
        (
            "The paper picks rho by training on env_1 and validating on env_2 and env_3 (Sec. 6). The released repository "
            "holds every rho it searched, 5 seeds each; evaluated here with `eval.py --protocol climate` (paper-tables days) "
            "and read by `experiments/rho_selection.py` (commands in its docstring). **Rule**: the rho > 0 with the best mean "
            "of env_2 and env_3. **Best env_6**: the rho > 0 with the best env_6. **P (exchangeable)**: if rho did not change "
            "env_6, the chance that the best env_6 mean of the grid is at least the observed best (permutation test); "
            "**inflation**: by how much the best of the grid then exceeds the pooled mean on average. **Ours - released**: "
            "our runs at the published rho against the released runs at that rho, env_6, 95% stratified bootstrap interval."
        ),
        "",
        (
            "| published row | rho grid | published rho | rule picks | best env_6 | env_6 at published rho (released) "
            "| env_6 at the rule's rho (released) | P (exchangeable) | inflation | ours - released [95% CI] |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in sorted(grid, key=lambda k: grid[k]["row"]):
        g = grid[family]
        env6 = {rho: mean_se([s["env_6"] for s in seeds.values()]) for rho, seeds in g["seeds"].items()}
        c = g.get("ours_minus_released_env6")
        ours = f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] ({c['ours_seeds']} seeds)" if c else "-"
        lines.append(
            f"| {g['row']} | {', '.join(sorted(g['seeds'], key=float))} | {g['published_rho']} | {g['rule_rho']} "
            f"| {g['best_env6_rho']} | {_cell(env6, g['published_rho'])} | {_cell(env6, g['rule_rho'])} "
            f"| {g['exchangeable_p_best_env6']:.2f} | {g['exchangeable_inflation']:+.3f} | {ours} |"
        )
    diffs = [g["ours_minus_released_env6"] for g in grid.values() if "ours_minus_released_env6" in g]
    if diffs:
        neg, sig = sum(d["diff"] < 0 for d in diffs), sum(d["high"] < 0 or d["low"] > 0 for d in diffs)
        agree = sum(g["rule_rho"] == g["published_rho"] for g in grid.values())
        best = sum(g["best_env6_rho"] == g["published_rho"] for g in grid.values())
        summary = (
            f"Ours - released at the published rho, env_6: below 0 in {neg} of {len(diffs)} rows, the interval excluding 0 "
            f"in {sig}. Rule and published rho agree in {agree} of {len(grid)} rows; the published rho is the grid's best "
            f"env_6 in {best}."
        )
        lines += ["", summary]
    return lines + [""]


def main(args: Args) -> str:
    runs = load_runs(args.results)
    if not runs:
        envs.fail(f"results: no result JSON files in {', '.join(args.results)}")
    groups = group(runs)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    figs = plot(groups, os.path.join(out_dir, "results"))
    lines = [
        "# Results",
        "",
        "Generated by `python experiments/report.py "
        + " ".join(os.path.relpath(f, ROOT) for f in args.results)
        + "` from the per-run JSON files the sweep wrote (`python experiments/sweep.py <grid>`); do not edit by hand.",
        "",
        REPRODUCIBILITY,
        "",
    ]
    lines += tables(groups)
    rho_grid = os.path.join(out_dir, "results", RHO_GRID)
    if os.path.isfile(rho_grid):
        lines += [""] + rho_grid_section(rho_grid)
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in figs]
    marl = os.path.join(out_dir, "results", MARL_EVAL)
    with open(marl + ".tmp", "w") as f:
        json.dump(marl_eval(groups), f)
    os.replace(marl + ".tmp", marl)
    lines += [
        "",
        (
            f"Every run in [marl-eval](https://github.com/instadeepai/marl-eval)'s JSON format: [{MARL_EVAL}]"
            f"({os.path.relpath(marl, out_dir)}) (environment `building`: tasks env_1..env_6 and season, the final "
            "greedy evaluation; `building_training`: the training curves on env_1). marl-eval's aggregation needs the "
            "same number of runs for every algorithm of an environment: select algorithms with equal seeds first (e.g. "
            "the `*_released` ones once all have 5)."
        ),
        "",
        "## Runs",
        "",
        "| run | commit | train min | machine | command |",
        "|---|---|---|---|---|",
    ]
    for runs_ in groups.values():
        for r in runs_:
            lines.append(
                f"| {r['run_name']} | {r['commit']} | {r['train_seconds'] / 60:.0f} | {machine(r)} | `{r['command']}` |"
            )
    text = "\n".join(lines) + "\n"
    with open(args.out + ".tmp", "w") as f:
        f.write(text)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out} ({len(runs)} runs, {len(groups)} method/rho cells)")
    return text


if __name__ == "__main__":
    main(tyro.cli(Args))
