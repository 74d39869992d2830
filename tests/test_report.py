"""The claims table of docs/results.md (issue 15 items 4-6): experiments/stats.py and experiments/report.py.

Every expected value is computed here by hand or by brute force, independently of the code under test:
bootstrap intervals whose bounds are extreme resamples (2 seeds a side) or the exact percentiles of the
fully enumerated bootstrap distribution (3 seeds a side: 27 x 27 equally likely resamples), probabilities of
improvement counted pair by pair, the paper's differences from the published cells (typed from
../shared/notes/paper-facts.md, not read from report.py), and marl-eval's data format as its README states it.
"""

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
from conftest import import_file


@pytest.fixture(scope="module")
def stats():
    return import_file("stats_under_test", "experiments/stats.py")


@pytest.fixture(scope="module")
def report():
    return import_file("report_claims_under_test", "experiments/report.py")


# ----------------------------------------------------------------------------------------- statistics
def test_bootstrap_with_two_seeds_a_side_spans_the_extreme_resamples(stats):
    """x = (0.5, 0.7), y = (0.2, 0.4): each side has 4 equally likely resamples, so the lowest difference
    mean(0.5, 0.5) - mean(0.4, 0.4) = 0.1 has probability 1/16 = 6.25% > 2.5%, and so has the highest,
    0.7 - 0.2 = 0.5: the 95% percentile interval is exactly [0.1, 0.5] around 0.6 - 0.3 = 0.3. A paired
    resample (one index for both sides) would give 0.3 every time; a normal interval would not hit the atoms."""
    d, lo, hi = stats.bootstrap_diff_ci([0.5, 0.7], [0.2, 0.4])
    assert d == pytest.approx(0.3, abs=1e-12)
    assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.5, abs=1e-12)
    assert stats.bootstrap_diff_ci([0.5, 0.7], [0.2, 0.4]) == (d, lo, hi)  # fixed RNG seed: same input, same interval


def test_bootstrap_matches_the_enumerated_bootstrap_distribution(stats):
    """3 seeds a side: all 27 x 27 ordered resamples are equally likely; the exact 2.5% / 97.5% percentiles are
    the atoms where the enumerated CDF crosses 0.025 / 0.975. The case is chosen so those crossings are >= 0.005
    away from any atom boundary (the Monte Carlo CDF of 50,000 replicates has SD ~0.0007 there, so the sampled
    percentile lands on the exact atom), and so the 5% / 95% atoms differ (a 90% interval would fail)."""
    x, y = [0.1, 0.4, 0.9], [0.0, 0.2, 0.7]
    counts = Counter()
    for ix in itertools.product(range(3), repeat=3):
        for iy in itertools.product(range(3), repeat=3):
            counts[round(sum(x[i] for i in ix) / 3 - sum(y[i] for i in iy) / 3, 12)] += 1
    atoms = sorted(counts)
    cdf = np.cumsum([counts[a] for a in atoms]) / 3**6

    def exact(q):
        i = int(np.searchsorted(cdf, q))
        margin = min(cdf[i] - q, q - (cdf[i - 1] if i else 0.0))
        return atoms[i], margin

    (lo_exact, m_lo), (hi_exact, m_hi) = exact(0.025), exact(0.975)
    assert min(m_lo, m_hi) >= 0.005 and exact(0.05)[0] != lo_exact and exact(0.95)[0] != hi_exact
    d, lo, hi = stats.bootstrap_diff_ci(x, y)
    assert d == pytest.approx(np.mean(x) - np.mean(y), abs=1e-12)
    assert lo == pytest.approx(lo_exact, abs=1e-9) and hi == pytest.approx(hi_exact, abs=1e-9)
    assert (lo_exact, hi_exact) == (pytest.approx(-1 / 3), pytest.approx(2 / 3))


def test_probability_of_improvement_counts_pairs_and_half_ties(stats):
    """x = (0.5, 0.7), y = (0.5, 0.4): of the 4 pairs, (0.5, 0.5) ties (1/2) and the other three are wins:
    3.5 / 4 = 0.875; the other way round 0.5 / 4 = 0.125 (the two always sum to 1)."""
    assert stats.probability_of_improvement([0.5, 0.7], [0.5, 0.4]) == 0.875
    assert stats.probability_of_improvement([0.5, 0.4], [0.5, 0.7]) == 0.125
    assert stats.probability_of_improvement([0.1, 0.2, 0.3], [0.0]) == 1.0  # unequal sizes: 3 pairs, all wins


def test_verdict_is_the_side_of_zero_our_interval_lies_on(stats):
    """reproduced = the interval excludes 0 on the paper's side, not reproduced = on the other side, else
    not significant; for a positive and a negative paper difference."""
    assert stats.verdict(+0.1, 0.05, 0.2) == "reproduced"
    assert stats.verdict(+0.1, -0.2, -0.05) == "not reproduced"
    assert stats.verdict(+0.1, -0.1, 0.1) == "not significant either way"
    assert stats.verdict(-0.1, -0.2, -0.05) == "reproduced"
    assert stats.verdict(-0.1, 0.05, 0.2) == "not reproduced"


# ----------------------------------------------------------------------------------------- the report
def fake(method, rho, seed, env1, env6, season, paper, script="algos/robust_vdn_tv.py", machine=None, flags=()):
    climate = {f"env_{i}": env1 - 0.01 * i for i in range(1, 7)}
    climate["env_1"], climate["env_6"] = env1, env6
    run = {
        "grid": "g",
        "method": method,
        "paper": paper,
        "script": script,
        "flags": ["--env", "building", *flags],
        "rho": rho,
        "seed": seed,
        "run_name": f"g/{method}__rho{rho!r}__seed{seed}",
        "command": f"python {script} --seed {seed}",
        "args": {},
        "commit": "abc",
        "train_seconds": 120.0,
        "eval_days": [1, 2],
        "normalised_return": {"paper-tables": {"env_1": env1, "env_6": env6}, "climate": climate, "season": {"env_1": season}},
        "curve": {
            "tag": "charts/normalised_return",
            "episodes": [10, 20, 30],
            "env_steps": [2870, 5740, 8610],
            "mean": [env1 - 0.5, env1 - 0.2, env1],
        },
    }
    if machine is not None:
        run["machine"] = machine
    return run


SCHEDULE = ("--update-schedule", "released")
EPYC = [{"cpu": "AMD EPYC 7B13", "torch": "2.13.0+cpu", "torch_threads": 1, "python": "3.11.7"}]
RUNS = [  # (method, rho, seed, env_1, env_6, season, paper row, script)
    ("vdn_released", 0.0, 1, 0.85, 0.2, 0.5, "VDN non-robust", "algos/robust_vdn_rho.py"),
    ("vdn_released", 0.0, 2, 0.88, 0.4, 0.6, "VDN non-robust", "algos/robust_vdn_rho.py"),
    ("vdn_tv_released", 0.5, 1, 0.90, 0.5, 0.30, "VDN TV", "algos/robust_vdn_tv.py"),
    ("vdn_tv_released", 0.5, 2, 0.80, 0.7, 0.35, "VDN TV", "algos/robust_vdn_tv.py"),
    # decoys: not the released configuration, or not the published rho: never in the claims
    ("vdn_tv_paper", 0.5, 1, 0.10, -0.9, -0.9, "VDN TV", "algos/robust_vdn_tv.py"),
    ("vdn_tv_paper", 0.5, 2, 0.12, -0.8, -0.8, "VDN TV", "algos/robust_vdn_tv.py"),
    ("vdn_tv_released", 0.3, 1, 0.11, -0.7, -0.7, "VDN TV", "algos/robust_vdn_tv.py"),
    ("vdn_tv_released", 0.3, 2, 0.13, -0.6, -0.6, "VDN TV", "algos/robust_vdn_tv.py"),
    # one robust seed: n/a
    ("qmix_released", 0.0, 1, 0.89, 0.5, 0.6, "QMIX non-robust", "algos/robust_qmix_rho.py"),
    ("qmix_released", 0.0, 2, 0.90, 0.6, 0.6, "QMIX non-robust", "algos/robust_qmix_rho.py"),
    ("qmix_tv_released", 0.2, 1, 0.92, 0.45, 0.66, "QMIX TV", "algos/robust_qmix_tv.py"),
    # a single-factor ablation of vdn_tv_released (+ one flag): the ablations table, never a claim (its values would
    # change the VDN TV claim); at rho 0.3 one seed against the two of the rho-0.3 base: n/a
    ("vdn_tv_released_schedule", 0.5, 1, 0.87, 0.3, 0.40, "VDN TV", "algos/robust_vdn_tv.py", SCHEDULE),
    ("vdn_tv_released_schedule", 0.5, 2, 0.85, 0.1, 0.20, "VDN TV", "algos/robust_vdn_tv.py", SCHEDULE),
    ("vdn_tv_released_schedule", 0.3, 1, 0.50, 0.0, 0.00, "VDN TV", "algos/robust_vdn_tv.py", SCHEDULE),
]


@pytest.fixture(scope="module")
def written(report, tmp_path_factory):
    """The report of RUNS, written twice from one folder that also receives marl_eval.json (so the second pass
    reads that folder with the marl-eval file in it)."""
    root = tmp_path_factory.mktemp("claims")
    res = root / "results"
    res.mkdir()
    for i, (method, rho, seed, e1, e6, se, paper, script, *flags) in enumerate(RUNS):
        run = fake(
            method, rho, seed, e1, e6, se, paper, script, machine=EPYC if i == 0 else None, flags=flags[0] if flags else ()
        )
        (res / f"{method}__rho{rho}__seed{seed}.json").write_text(json.dumps(run))
    out = root / "results.md"
    first = report.main(report.Args(results=[str(res)], out=str(out)))
    second = report.main(report.Args(results=[str(res)], out=str(out)))
    return {"root": root, "first": first, "text": second}


def claim_row(text, claim, evaluated_on):
    rows = [line for line in text.splitlines() if line.startswith(f"| {claim} | {evaluated_on}")]
    assert len(rows) == 1, rows
    return [c.strip() for c in rows[0].split("|")[1:-1]]


def test_report_is_deterministic_and_skips_its_own_marl_eval_file(written):
    """The second pass over the folder (now holding marl_eval.json) gives the same report byte for byte: the
    bootstrap's RNG is fixed and the marl-eval file is not read as a run."""
    assert (written["root"] / "results" / "marl_eval.json").is_file()
    assert written["text"] == written["first"]
    assert sum(line.startswith("| g/") for line in written["text"].splitlines()) == len(RUNS)


def test_claims_rows_against_hand_computed_differences(written):
    """VDN TV - VDN non-robust from the released runs only (the decoys would pull every number below 0):
    env_6: x = (0.5, 0.7), y = (0.2, 0.4): +0.300 [+0.100, +0.500] (the extreme resamples, 2 seeds a side),
      P = 4/4; paper Table 2: 0.627 - 0.440 = +0.187 +- sqrt(0.049^2 + 0.040^2) = 0.063, inside: reproduced.
    env_1: x = (0.90, 0.80), y = (0.85, 0.88): -0.015 [0.80 - 0.88, 0.90 - 0.85] = [-0.080, +0.050], P = 2/4;
      paper Table 1: 0.898 - 0.877 = +0.021 +- sqrt(0.008^2 + 0.012^2) = 0.014, inside: not significant.
    season: x = (0.30, 0.35), y = (0.5, 0.6): -0.225 [-0.300, -0.150], P = 0; paper (Table 1) +0.021: not
      reproduced, and the paper's difference lies outside our interval."""
    text = written["text"]
    se2 = math.hypot(0.049, 0.040)
    assert claim_row(text, "VDN TV > VDN non-robust", "env_6") == [
        "VDN TV > VDN non-robust",
        "env_6 (Table 2)",
        f"{0.627 - 0.440:+.3f} +- {se2:.3f}",
        "+0.300 [+0.100, +0.500]",
        "2 vs 2",
        "1.00",
        "yes",
        "reproduced",
    ]
    env1 = claim_row(text, "VDN TV > VDN non-robust", "env_1")
    assert env1[2] == f"{0.898 - 0.877:+.3f} +- {math.hypot(0.008, 0.012):.3f}"
    assert env1[3:] == ["-0.015 [-0.080, +0.050]", "2 vs 2", "0.50", "yes", "not significant either way"]
    season = claim_row(text, "VDN TV > VDN non-robust", "season")
    assert season[2] == env1[2] and season[3:] == ["-0.225 [-0.300, -0.150]", "2 vs 2", "0.00", "no", "not reproduced"]


def test_claims_with_fewer_than_two_seeds_are_not_computed(written):
    """QMIX TV has one seed (QMIX non-robust two): n/a with both counts; cells with no runs at all: 0 vs 0.
    The paper's difference is still shown: Table 2 QMIX TV - non-robust = 0.520 - 0.478 = +0.042 +- 0.071."""
    qmix = claim_row(written["text"], "QMIX TV > QMIX non-robust", "env_6")
    assert qmix[2] == f"{0.520 - 0.478:+.3f} +- {math.hypot(0.048, 0.052):.3f}"
    assert qmix[3:] == ["n/a (1 vs 2 seeds)", "1 vs 2", "-", "-", "-"]
    assert claim_row(written["text"], "QTRAN GroupDR > QTRAN non-robust", "env_6")[3] == "n/a (0 vs 0 seeds)"
    claims = [line for line in written["text"].splitlines() if line.startswith("| ") and " > " in line.split("|")[1]]
    assert len(claims) == 3 * 3 * 3  # VDN/QMIX/QTRAN x rho-contamination/TV/GroupDR x env_6/env_1/season


def test_ablations_against_their_base_by_hand(written):
    """vdn_tv_released_schedule = vdn_tv_released + `--update-schedule released` (the longest method name it extends,
    same grid and rho; vdn_tv_paper and the rest extend nothing). 2 seeds a side, so the interval is the extreme
    resamples [min x - max y, max x - min y]:
    env_1: x = (0.87, 0.85), y = (0.90, 0.80): +0.010 [-0.050, +0.070], P = 2/4;
    env_6: x = (0.3, 0.1), y = (0.5, 0.7): -0.400 [-0.600, -0.200], P = 0;
    season: x = (0.40, 0.20), y = (0.30, 0.35): -0.025 [-0.150, +0.100], P = 2/4.
    At rho 0.3 the ablation has one seed (its base two): n/a."""
    lines = written["text"].splitlines()
    start = lines.index("## Single-factor ablations")
    rows = [line for line in lines[start : start + 8] if line.startswith(("| vdn", "| qmix"))]
    added = "vdn_tv_released_schedule | vdn_tv_released | `--update-schedule released`"
    assert rows == [
        f"| {added} | 0.3 | 1 vs 2 | n/a | n/a | n/a |",
        (
            f"| {added} | 0.5 | 2 vs 2 | +0.010 [-0.050, +0.070], P 0.50 | -0.400 [-0.600, -0.200], P 0.00 "
            "| -0.025 [-0.150, +0.100], P 0.50 |"
        ),
    ]


def test_marl_eval_json_follows_the_marl_eval_format(written):
    """marl-eval's README: environment -> task -> algorithm -> run -> step_<i> {step_count: int, metric: [numbers]}
    plus absolute_metrics {metric: [numbers]} in every run; the same steps and metrics in every run of a task;
    algorithm names without commas (and lower case: marl-eval lower-cases keys). Values are the runs' own numbers:
    `building` holds the final evaluation (env_1..env_6 from climate, season), `building_training` the curve."""
    data = json.loads((written["root"] / "results" / "marl_eval.json").read_text())
    assert set(data) == {"building", "building_training"}
    assert list(data["building"]) == [f"env_{i}" for i in range(1, 7)] + ["season"]
    assert list(data["building_training"]) == ["env_1"]
    for env, tasks in data.items():
        for task, algos in tasks.items():
            for algo, runs in algos.items():
                assert "," not in algo and algo == algo.lower()
                shapes = set()
                for run_name, run in runs.items():
                    assert run_name.startswith("seed_") and "absolute_metrics" in run
                    metrics = set(run["absolute_metrics"])
                    for step, content in run.items():
                        assert all(
                            isinstance(v, list) and all(math.isfinite(x) for x in v)
                            for k, v in content.items()
                            if k != "step_count"
                        )
                        if step != "absolute_metrics":
                            assert step.startswith("step_") and type(content["step_count"]) is int
                            assert set(content) - {"step_count"} == metrics
                    shapes.add(tuple(run))
                assert len(shapes) == 1, (env, task, algo)  # every run of an algorithm has the same steps
    runs = {(m, rho, s): (e1, e6, se) for m, rho, s, e1, e6, se, *_ in RUNS}
    for (method, rho, seed), (e1, e6, season) in runs.items():
        algo, run = f"{method}_rho{rho:g}", f"seed_{seed}"
        b = data["building"]
        assert b["env_6"][algo][run] == {
            "step_0": {"step_count": 8610, "normalised_return": [e6]},
            "absolute_metrics": {"normalised_return": [e6]},
        }
        assert b["env_3"][algo][run]["step_0"]["normalised_return"] == [pytest.approx(e1 - 0.03)]
        assert b["season"][algo][run]["absolute_metrics"]["normalised_return"] == [season]
        curve = data["building_training"]["env_1"][algo][run]
        assert [curve[f"step_{i}"]["step_count"] for i in range(3)] == [2870, 5740, 8610]
        assert [curve[f"step_{i}"]["normalised_return"][0] for i in range(3)] == pytest.approx([e1 - 0.5, e1 - 0.2, e1])
        assert curve["absolute_metrics"] == {"normalised_return": [e1]}
    assert sum(len(r) for r in data["building"]["env_1"].values()) == len(RUNS)


def test_runs_table_names_the_machine_and_figure_2_has_season(written):
    """The first run carries sweep.py's machine field (CPU model, torch, threads): its row names them; runs
    without it show '-'. Figure 2's table ends with season env_1 (mean +- SE over the 2 seeds of vdn_released:
    mean 0.55, population std 0.05 / sqrt(2) = 0.035). The note on agreement across machines comes before the tables."""
    lines = written["text"].splitlines()
    row = next(line for line in lines if line.startswith("| g/vdn_released__rho0.0__seed1 "))
    assert "| AMD EPYC 7B13, torch 2.13.0+cpu, 1 thread(s) |" in row
    other = next(line for line in lines if line.startswith("| g/vdn_released__rho0.0__seed2 "))
    assert other.split("|")[4].strip() == "-"
    fig2 = [line for line in lines if line.startswith("| vdn_released | 0 | ") and line.count("|") == 10]
    assert len(fig2) == 1 and fig2[0].endswith("| 0.550 +- 0.035 |")
    note = next(i for i, line in enumerate(lines) if line.startswith("**What agreement to expect"))
    assert note < next(i for i, line in enumerate(lines) if line.startswith("## Tables 1-2"))
