"""experiments/rho_selection.py: the paper's rho rule, the bootstrap optimism and the permutation test on
inputs small enough to enumerate by hand."""

import itertools
import json
import os

import numpy as np
import pytest
from conftest import import_file


@pytest.fixture(scope="module")
def sel():
    return import_file("rho_selection_under_test", "experiments/rho_selection.py")


def seed_row(e2, e3, e6, e1=0.9):
    return {"env_1": e1, "env_2": e2, "env_3": e3, "env_4": 0.0, "env_5": 0.0, "env_6": e6}


def test_pick_follows_the_rule(sel):
    """Validation = mean of env_2 and env_3: rho 0.1 (0.85) beats rho 0.2 (0.825), though env_2 alone would
    pick rho 0.2; env_6 prefers rho 0.2. A tie goes to the smaller rho."""
    means = {0.1: np.array([0.9, 0.8, 0.9, 0, 0, 0.3]), 0.2: np.array([0.9, 0.85, 0.8, 0, 0, 0.6])}
    assert sel.pick(means, "validation") == 0.1
    assert sel.pick(means, "env_6") == 0.2
    means[0.3] = np.array([0.0, 0.85, 0.85, 0, 0, 0.0])  # ties rho 0.1 on validation
    assert sel.pick(means, "validation") == 0.1


def test_optimism_is_zero_without_seed_noise(sel):
    """Every seed of a rho identical: each resample equals the data, the pick never changes, optimism 0.
    rho 0 (the non-robust row) is no candidate even with the best numbers."""
    fam = {
        0.0: {"a": seed_row(1, 1, 1), "b": seed_row(1, 1, 1)},
        0.1: {"a": seed_row(0.8, 0.8, 0.3), "b": seed_row(0.8, 0.8, 0.3)},
        0.2: {"a": seed_row(0.7, 0.7, 0.6), "b": seed_row(0.7, 0.7, 0.6)},
    }
    assert sel.optimism(fam, "validation", reps=200, seed=0) == 0.0
    assert sel.optimism(fam, "env_6", reps=200, seed=0) == 0.0


def test_optimism_against_full_enumeration(sel):
    """Two candidates, two seeds each: 4 x 4 equally likely resamples, enumerated. Picking by env_6 here:
    rho 0.1 seeds env_6 (0.2, 0.8), rho 0.2 seeds (0.5, 0.5); data means 0.5 and 0.5."""
    fam = {
        0.1: {"a": seed_row(0, 0, 0.2), "b": seed_row(0, 0, 0.8)},
        0.2: {"a": seed_row(0, 0, 0.5), "b": seed_row(0, 0, 0.5)},
    }
    data = {0.1: 0.5, 0.2: 0.5}
    exact = []
    for r1 in itertools.product([0.2, 0.8], repeat=2):
        m1, m2 = np.mean(r1), 0.5
        picked, value = (0.1, m1) if m1 > m2 or (m1 == m2) else (0.2, m2)  # tie: the smaller rho
        exact.append(value - data[picked])
    expected = np.mean(exact)  # (0.3 of the (0.8, 0.8) resample + 0 + 0 + 0) / 4 = 0.075
    assert expected == pytest.approx(0.075)
    assert sel.optimism(fam, "env_6", reps=40_000, seed=1) == pytest.approx(expected, abs=0.006)


def test_exchangeable_max_by_enumeration(sel):
    """Pooled env_6 values {0, 0, 1, 1} split into two groups of two: the groups {1, 1} and {0, 0} arise in 1 of
    the 3 splits (best mean 1), otherwise both means are 0.5. Observed groups {1, 1}, {0, 0}: P = 1/3, and
    E[best] - pooled mean = (1/3 + 2/3 * 0.5) - 0.5 = 1/6."""
    fam = {
        0.1: {"a": seed_row(0, 0, 1.0), "b": seed_row(0, 0, 1.0)},
        0.2: {"a": seed_row(0, 0, 0.0), "b": seed_row(0, 0, 0.0)},
    }
    p, inflation = sel.exchangeable_max(fam, reps=30_000, seed=0)
    assert p == pytest.approx(1 / 3, abs=0.015)
    assert inflation == pytest.approx(1 / 6, abs=0.01)


def write_eval(path, entries, protocol="climate"):
    """eval.py's JSON format: one episode record per (checkpoint, config) with its days' normalised returns."""
    episodes = [
        {"checkpoint": ckpt, "label": label, "config": c, "days": 2, "returns": [0, 0], "normalised": [v, v]}
        for ckpt, label, row in entries
        for c, v in row.items()
    ]
    with open(path, "w") as f:
        json.dump({"protocol": protocol, "configs": [], "days": [], "table": {}, "episodes": episodes}, f)


def write_ours(tmp_path, env6, method="vdn_tv_released"):
    """Our per-run result JSON files (sweep format, the fields rho_selection reads) of `method` at rho 0.5."""
    ours = tmp_path / "ours"
    ours.mkdir(exist_ok=True)
    for seed, v in enumerate(env6, 1):
        run = {"method": method, "rho": 0.5, "seed": seed, "normalised_return": {"paper-tables": {"env_6": v}}}
        (ours / f"{method}__rho0.5__seed{seed}.json").write_text(json.dumps(run))
    return ours


def released_vdn_tv(seed: int, rho: float, row: dict):
    """One released checkpoint's eval entry (checkpoint dir, label, per-config values) of the VDN-TV grid."""
    return (f"/x/results_seeds_{seed}/robust_vdn_g_rho_{rho}_2025/network_parameter", f"authors: robust_vdn_g_rho_{rho}", row)


def test_main_reads_eval_json_and_compares_ours(sel, tmp_path, capsys):
    entries = []
    for s, (e6a, e6b) in enumerate([(0.4, 0.7), (0.6, 0.9)]):
        entries += [released_vdn_tv(s, 0.3, seed_row(0.9, 0.9, e6a)), released_vdn_tv(s, 0.5, seed_row(0.8, 0.8, e6b))]
        entries.append(released_vdn_tv(s, 0.0, seed_row(1, 1, 1)))
        entries.append((f"/x/results_seeds_{s}/other/network_parameter", "authors: vdn_dr", seed_row(1, 1, 1)))  # not a grid
    write_eval(tmp_path / "e.json", entries)
    ours = write_ours(tmp_path, [0.5, 0.6])
    write_ours(tmp_path, [0.2, 0.3, 0.4], method="vdn_tv_released_schedule")  # a single-factor ablation of it
    write_ours(tmp_path, [0.9, 0.9], method="vdn_tv_releasedx")  # not one (no underscore after the name)
    out = tmp_path / "sum" / "grid.json"
    s = sel.main(sel.Args(evals=[str(tmp_path / "e.json")], ours=str(ours), out=str(out), reps=2000))
    g = s["vdn_g"]
    assert (g["rule_rho"], g["published_rho"], g["best_env6_rho"]) == (0.3, 0.5, 0.5)
    assert g["seeds"]["0.5"] == {"results_seeds_0": seed_row(0.8, 0.8, 0.7), "results_seeds_1": seed_row(0.8, 0.8, 0.9)}
    c = g["ours_minus_released_env6"]  # ours (0.5, 0.6) - released (0.7, 0.9) = 0.55 - 0.8
    assert c["ours_seeds"] == 2 and c["diff"] == pytest.approx(-0.25)
    assert c["low"] == pytest.approx(-0.4) and c["high"] == pytest.approx(-0.1)  # extreme resamples (2 a side)
    grid = g["ours_against_grid"]  # ours and the ablation against each released rho cell
    assert set(grid) == {"vdn_tv_released rho 0.5", "vdn_tv_released_schedule rho 0.5"}
    assert grid["vdn_tv_released rho 0.5"]["0.3"]["diff"] == pytest.approx(0.55 - 0.5)  # released rho 0.3: (0.4, 0.6)
    assert grid["vdn_tv_released_schedule rho 0.5"]["0.5"]["diff"] == pytest.approx(0.3 - 0.8)
    assert grid["vdn_tv_released_schedule rho 0.5"]["0.3"]["diff"] == pytest.approx(0.3 - 0.5)
    assert json.loads(out.read_text()) == json.loads(json.dumps(s))
    assert not os.path.exists(str(out) + ".tmp")
    assert "the paper's rule picks 0.3" in capsys.readouterr().out


def test_bad_input_is_one_error_line(sel, tmp_path, capsys):
    write_eval(tmp_path / "p.json", [], protocol="paper-tables")
    with pytest.raises(SystemExit) as e:
        sel.main(sel.Args(evals=[str(tmp_path / "p.json")]))
    assert e.value.code != 0
    assert (
        capsys.readouterr().err.strip()
        == f"error: evals: '{tmp_path / 'p.json'}' is protocol 'paper-tables'; run eval.py with --protocol climate"
    )
    with pytest.raises(SystemExit):
        sel.main(sel.Args(evals=[str(tmp_path / "p.json")], ours=str(tmp_path / "none")))
    assert "--ours: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sel.main(sel.Args(evals=[str(tmp_path / "p.json")], reps=0))
    assert capsys.readouterr().err.strip() == "error: --reps must be a positive number of bootstrap replicates (got 0)"


def test_report_section_from_the_grid_json(sel, tmp_path):
    """experiments/report.py's section from rho_selection's JSON: the row read back, numbers by hand
    (released env_6 at rho 0.5: seeds 0.7, 0.9 -> 0.800 +- 0.1 / sqrt(2); at rho 0.3: 0.4, 0.6 -> 0.500 +- 0.071)."""
    report = import_file("report_rho_grid_under_test", "experiments/report.py")
    entries = []
    for s, (e6a, e6b) in enumerate([(0.4, 0.7), (0.6, 0.9)]):
        entries += [released_vdn_tv(s, 0.3, seed_row(0.9, 0.9, e6a)), released_vdn_tv(s, 0.5, seed_row(0.8, 0.8, e6b))]
    write_eval(tmp_path / "e.json", entries)
    out = tmp_path / "results" / "released" / "rho_grid.json"
    sel.main(sel.Args(evals=[str(tmp_path / "e.json")], out=str(out), reps=500))
    lines = report.rho_grid_section(str(out))
    assert lines[0].startswith("## How the published rho was picked")
    row = next(line for line in lines if line.startswith("| VDN TV"))
    assert row.startswith("| VDN TV | 0.3, 0.5 | 0.5 | 0.3 | 0.5 | 0.800 +- 0.071 | 0.500 +- 0.071 | ")
    assert row.endswith("| - |")  # no --ours: no comparison
    assert not any(line.startswith("Ours - released") for line in lines)
    sel.main(sel.Args(evals=[str(tmp_path / "e.json")], out=str(out), reps=500, ours=str(write_ours(tmp_path, [0.5, 0.6]))))
    summary = next(line for line in report.rho_grid_section(str(out)) if line.startswith("Ours - released"))
    assert summary == (
        "Ours - released at the published rho, env_6: below 0 in 1 of 1 rows, the interval excluding 0 in 1. "
        "Rule and published rho agree in 0 of 1 rows; the published rho is the grid's best env_6 in 1."
    )
