"""Which rho the paper's own rule picks on the authors' released rho grids, and what picking costs.

The paper (Sec. 6, "Choice of rho") selects rho "by training on env_1 and validating on env_2 and env_3".
The released repository (`iclr2026-anonymous/robust-coMARL`) holds every rho it searched, 5 seeds each, as
per-agent checkpoints (`results_seeds_<s>/robust_<family>_rho_<rho>_<date>/network_parameter`; family `vdn`,
`qmix`, `qtran` = rho-contamination, `vdn_g`, `qmix_g`, `qtran_g` = TV). Evaluate them with our evaluator,
then read the grid here:

    python eval.py --authors-dir <released>/results_seeds_*/robust_vdn_g_rho_*/network_parameter \\
        --protocol climate --out results/released_vdn_g.json                  # one file per family (or all in one)
    python experiments/rho_selection.py results/released_*.json --ours docs/results/paper_tables \\
        --out docs/results/released_rho_grid.json

Per family and rho (rho > 0: rho 0 is the non-robust row): seeds, env_1, the validation score (the mean of
env_2 and env_3 over seeds, the paper's rule), env_6 mean +- SE; which rho the rule picks, which rho was
published, which rho has the best env_6. Then the optimism of reporting a picked cell, estimated by
Efron's bootstrap: resample each rho's seeds with replacement (a seed keeps all its environments), pick
rho on the resample, and average [the picked rho's env_6 on the resample - its env_6 on the data]. That is
how much a cell picked this way overstates what new seeds at the same rho give (Efron & Tibshirani 1993,
ch. 17). With `--ours`: our paper_tables runs at the published rho against the released runs at that rho,
env_6, with experiments/stats.py's stratified bootstrap interval.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stats

import envs

CONFIGS = ("env_1", "env_2", "env_3", "env_4", "env_5", "env_6")
VALIDATION = ("env_2", "env_3")  # the paper's rule: train on env_1, validate on env_2 and env_3
# released family -> (published row, published rho, our method in experiments/paper_tables.toml); paper-facts.md
PUBLISHED = {
    "vdn": ("VDN rho-contamination", 0.008, "vdn_rho_released"),
    "qmix": ("QMIX rho-contamination", 0.012, "qmix_rho_released"),
    "qtran": ("QTRAN rho-contamination", 0.02, "qtran_rho_released"),
    "vdn_g": ("VDN TV", 0.5, "vdn_tv_released"),
    "qmix_g": ("QMIX TV", 0.2, "qmix_tv_released"),
    "qtran_g": ("QTRAN TV", 0.2, "qtran_tv_released"),
}
LABEL = re.compile(r"robust_([a-z]+(?:_g)?)_rho_([0-9.]+)$")


@dataclass
class Args:
    evals: tyro.conf.Positional[list[str]] = field(default_factory=list)
    """eval.py --protocol climate JSON files of released checkpoints (--authors-dir)"""
    ours: str = ""
    """folder of our per-run result JSON files (docs/results/paper_tables) to compare at the published rho"""
    out: str = ""
    """write the per-seed grid and the selections here as JSON (atomically); empty = print only"""
    reps: int = 20_000
    """bootstrap replicates"""
    seed: int = 0
    """bootstrap RNG seed (fixed: the same input gives the same numbers)"""


def load(paths: list[str]) -> dict:
    """family -> rho -> seed directory -> config -> the seed's mean normalised return over the protocol's days."""
    grid = {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            envs.fail(f"evals: cannot read '{path}' as eval.py JSON ({e})")
        if data.get("protocol") != "climate":
            envs.fail(f"evals: '{path}' is protocol {data.get('protocol')!r}; run eval.py with --protocol climate")
        for ep in data["episodes"]:
            m = LABEL.search(ep["label"])
            if m is None:
                continue  # not a released rho-grid run
            family, rho = m.group(1), float(m.group(2))
            grid.setdefault(family, {}).setdefault(rho, {}).setdefault(ep["checkpoint"], {})[ep["config"]] = float(
                np.mean(ep["normalised"])
            )
    return grid


def matrix(runs: dict) -> np.ndarray:
    """The seeds of one rho as a (seeds, configs) array in CONFIGS order."""
    return np.array([[r[c] for c in CONFIGS] for r in runs.values()])


def pick(means: dict, rule: str) -> float:
    """The rho whose mean over seeds is best: rule "validation" (env_2 and env_3, the paper's) or "env_6"."""
    cols = [CONFIGS.index(c) for c in (VALIDATION if rule == "validation" else ("env_6",))]
    return max(means, key=lambda rho: (means[rho][cols].mean(), -rho))  # ties: the smaller rho


def optimism(family: dict, rule: str, reps: int, seed: int) -> float:
    """Efron's bootstrap optimism of reporting env_6 of the rho picked by `rule` (candidates: rho > 0)."""
    seeds = {rho: matrix(runs) for rho, runs in family.items() if rho > 0}
    data = {rho: x.mean(0) for rho, x in seeds.items()}
    rng, e6, total = np.random.default_rng(seed), CONFIGS.index("env_6"), 0.0
    for _ in range(reps):
        boot = {rho: x[rng.integers(0, len(x), len(x))].mean(0) for rho, x in seeds.items()}
        r = pick(boot, rule)
        total += boot[r][e6] - data[r][e6]
    return total / reps


def mean_se(x) -> tuple[float, float]:
    """Mean over seeds +- population std / sqrt(n) (as the paper and experiments/report.py)."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std() / np.sqrt(len(x)))


def exchangeable_max(family: dict, reps: int, seed: int) -> tuple[float, float]:
    """If rho did not matter for env_6 (the candidates' seeds exchangeable), how high would the best of the
    candidates' env_6 means come out? Permutation test: shuffle the pooled seeds into groups of the same sizes.
    Returns (P(best mean >= the observed best), E[best mean] - the pooled mean: the inflation of a best-of-K cell)."""
    groups = [matrix(runs)[:, CONFIGS.index("env_6")] for rho, runs in family.items() if rho > 0]
    pooled, cuts = np.concatenate(groups), np.cumsum([len(g) for g in groups])[:-1]
    observed, rng = max(g.mean() for g in groups), np.random.default_rng(seed)
    best = np.array([max(g.mean() for g in np.split(rng.permutation(pooled), cuts)) for _ in range(reps)])
    return float((best >= observed - 1e-12).mean()), float(best.mean() - pooled.mean())


def our_env6(folder: str, method: str, rho: float) -> list[float]:
    values = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(f"{method}__") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                r = json.load(f)
            if r["method"] == method and abs(r["rho"] - rho) < 1e-9:
                values.append(r["normalised_return"]["paper-tables"]["env_6"])
    return values


def variants(folder: str, method: str) -> list[str]:
    """Our single-factor ablations of `method` in the folder: the methods named <method>_<suffix> (as report.py)."""
    names = {name.split("__")[0] for name in os.listdir(folder) if name.endswith(".json")}
    return sorted(n for n in names if n.startswith(method + "_"))


def against_grid(args: Args, family: dict, name: str, method: str, published: float) -> dict:
    """Where our runs fall in the released grid: our env_6 at the published rho (its single-factor ablations too, and,
    for a rho-contamination grid, our non-robust runs: <factorisation>_released at rho 0) minus each released rho cell,
    with its 95% interval."""
    ours = {f"{m} rho {published:g}": our_env6(args.ours, m, published) for m in [method, *variants(args.ours, method)]}
    if not name.endswith("_g"):  # rho-contamination grid: its rho 0 is the published non-robust row
        ours[f"{name}_released rho 0"] = our_env6(args.ours, f"{name}_released", 0.0)
    out = {}
    for label, values in ours.items():
        if len(values) < 2:
            continue
        out[label] = {}
        for rho in sorted(family):
            released = list(matrix(family[rho])[:, CONFIGS.index("env_6")])
            out[label][str(rho)] = dict(
                zip(("diff", "low", "high"), stats.bootstrap_diff_ci(values, released, seed=args.seed))
            )
        cells = ", ".join(f"{rho}: {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" for rho, c in out[label].items())
        print(f"ours ({label}, {len(values)} seeds) - each released rho, env_6: {cells}")
    return out


def main(args: Args) -> dict:
    if not args.evals:
        envs.fail("give one or more eval.py --protocol climate JSON files of released checkpoints")
    if args.ours and not os.path.isdir(args.ours):
        envs.fail(f"--ours: no such folder '{args.ours}'")
    if args.reps < 1:
        envs.fail(f"--reps must be a positive number of bootstrap replicates (got {args.reps})")
    grid, summary = load(args.evals), {}
    if not grid:
        envs.fail("evals: no released rho-grid run (label robust_<family>_rho_<rho>) in the files given")
    for family in sorted(grid):
        means = {rho: matrix(runs).mean(0) for rho, runs in grid[family].items() if rho > 0}
        row, published, method = PUBLISHED.get(family, (family, None, None))
        by_rule, best6 = pick(means, "validation"), pick(means, "env_6")
        print(f"\n{row} (released family {family}); published rho {published}; the paper's rule picks {by_rule}")
        print(f"{'rho':>6} {'seeds':>5} {'env_1':>7} {'valid.':>7} {'env_6':>14}  ")
        for rho in sorted(grid[family]):
            x = matrix(grid[family][rho])
            e6 = mean_se(x[:, CONFIGS.index("env_6")])
            mark = " ".join(
                t for t, r in (("rule", by_rule), ("published", published), ("best-env_6", best6)) if r == rho and rho > 0
            )
            valid = x[:, [CONFIGS.index(c) for c in VALIDATION]].mean()
            print(f"{rho:>6g} {len(x):>5} {x[:, 0].mean():7.3f} {valid:7.4f} {e6[0]:7.3f}+-{e6[1]:.3f}  {mark}")
        entry = {
            "row": row,
            "published_rho": published,
            "rule_rho": by_rule,
            "best_env6_rho": best6,
            "optimism_rule": optimism(grid[family], "validation", args.reps, args.seed),
            "optimism_best_env6": optimism(grid[family], "env_6", args.reps, args.seed),
            "exchangeable_p_best_env6": None,
            "exchangeable_inflation": None,
            "seeds": {
                str(rho): {os.path.basename(os.path.dirname(os.path.dirname(k))): v for k, v in runs.items()}
                for rho, runs in sorted(grid[family].items())
            },
        }
        entry["exchangeable_p_best_env6"], entry["exchangeable_inflation"] = exchangeable_max(
            grid[family], args.reps, args.seed
        )
        print(
            f"if rho did not matter for env_6: P(best of the grid >= the observed best) {entry['exchangeable_p_best_env6']:.3f}, "
            f"expected best - pooled mean {entry['exchangeable_inflation']:+.3f}"
        )
        print(
            f"optimism of the picked env_6 cell (bootstrap, {args.reps} reps): paper's rule {entry['optimism_rule']:+.3f}, "
            f"best env_6 of the grid {entry['optimism_best_env6']:+.3f}"
        )
        if args.ours and published in grid[family]:
            ours = our_env6(args.ours, method, published)
            released = list(matrix(grid[family][published])[:, CONFIGS.index("env_6")])
            if len(ours) >= 2:
                d, lo, hi = stats.bootstrap_diff_ci(ours, released, seed=args.seed)
                entry["ours_minus_released_env6"] = {"ours_seeds": len(ours), "diff": d, "low": lo, "high": hi}
                print(
                    f"ours ({method}, {len(ours)} seeds) - released, env_6 at rho {published}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                )
            entry["ours_against_grid"] = against_grid(args, grid[family], family, method, published)
        summary[family] = entry
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        os.replace(tmp, args.out)  # atomic: never a half-written file
        print(f"\nwrote {args.out}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
