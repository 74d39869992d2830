"""End-to-end StarCraft runs on SMAX (JaxMARL 3s_vs_5z, CPU): VDN-rho, QMIX-rho and VDN-TV train
with a tiny budget, run one training-time evaluation round with clean and noisy win rates, save a
checkpoint that eval.py evaluates (--protocol starcraft), and their eval.jsonl files feed the
Figure 3-4 plots (--protocol starcraft-curves)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_parallel, run_py

pytest.importorskip("jaxmarl")

TINY = [
    "--env",
    "smax",
    "--total-steps",
    "60",
    "--episode-steps",
    "30",
    "--eval-every",
    "40",
    "--eval-episodes",
    "2",
    "--learning-starts",
    "8",
    "--batch-size",
    "8",
    "--buffer-size",
    "100",
    "--torch-threads",
    "1",
    "--save-model",
    "--log-every",
    "1",
]
JOBS = [("robust_vdn_rho", ["--rho", "0.0"]), ("robust_qmix_rho", ["--rho", "0.01"]), ("robust_vdn_tv", ["--rho", "0.1"])]


@pytest.fixture(scope="module")
def smax_runs(tmp_path_factory):
    cwd = str(tmp_path_factory.mktemp("smax"))
    jobs = [(f"algos/{name}.py", [*extra, *TINY, "--run-name", name], cwd) for name, extra in JOBS]
    results = run_parallel(jobs, workers=2)
    return cwd, results


def test_scripts_train_and_evaluate_clean_and_noisy(smax_runs):
    cwd, results = smax_runs
    for (name, _), res in zip(JOBS, results):
        assert res.returncode == 0, res.stderr[-2000:]
        assert "eval at" in res.stdout and "noisy" in res.stdout
        run = os.path.join(cwd, "runs", name)
        assert os.path.isfile(os.path.join(run, "model.pt"))
        with open(os.path.join(run, "eval.jsonl")) as f:
            points = [json.loads(line) for line in f]
        assert len(points) == 1 and points[0]["step"] >= 40  # one round, between episodes
        # the stdout line reports that very round
        p = points[0]
        assert (
            f"eval at {p['step']} steps | win rate clean {p['win_rate_clean']:.3f} | noisy {p['win_rate_noisy']:.3f}"
        ) in res.stdout
        with open(os.path.join(run, "args.json")) as f:
            args = json.load(f)
        # StarCraft defaults from the SMAC literature replace the building ones left untouched
        assert args["gamma"] == 0.99 and args["end_e"] == 0.05 and args["buffer_size"] == 100


def test_eval_py_starcraft_protocols(smax_runs, tmp_path):
    cwd, _ = smax_runs
    ckpts = [os.path.join(cwd, "runs", name, "model.pt") for name, _ in JOBS]
    out = str(tmp_path / "sc.json")
    res = run_py("eval.py", "--checkpoints", *ckpts, "--protocol", "starcraft", "--episodes", "2", "--out", out, cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(out) as f:
        report = json.load(f)
    table, rows = report["table"], report["checkpoints"]
    assert len(table) == 3 and all(label.startswith("SMAX 3s_vs_5z") for label in table)
    # one seed per label: the table's mean is that checkpoint's rate, its SE 0 (population std of one number)
    assert [r["checkpoint"] for r in rows] == ckpts
    for r in rows:
        for key in ("win_rate_clean", "win_rate_noisy"):
            assert table[r["label"]][key] == [r[key], 0.0]
    curves = str(tmp_path / "curves.json")
    runs = [os.path.join(cwd, "runs", name) for name, _ in JOBS]
    res = run_py("eval.py", "--protocol", "starcraft-curves", "--runs", *runs, "--out", curves, cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(curves) as f:
        final = json.load(f)["final_noisy"]
    want = {}
    for (name, _), run in zip(JOBS, runs):  # each run's last noisy win rate, read from its own files here
        with open(os.path.join(run, "args.json")) as f:
            args = json.load(f)
        with open(os.path.join(run, "eval.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        want[f"{name} rho={float(args['rho'])}"] = [last["win_rate_noisy"]]
    assert final == want


def test_smax_checkpoint_refused_by_building_protocol(smax_runs, tmp_path):
    """A SMAX checkpoint given to a building protocol (paper-tables): one error line naming --checkpoints and
    smax. (The converse, a building checkpoint given to --protocol starcraft: test_core_eval.py.)"""
    cwd, _ = smax_runs
    res = run_py(
        "eval.py",
        "--checkpoints",
        os.path.join(cwd, "runs", "robust_vdn_rho", "model.pt"),
        "--protocol",
        "paper-tables",
        "--out",
        str(tmp_path / "x.json"),
        cwd=cwd,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--checkpoints" in lines[0] and "smax" in lines[0]
    assert not os.path.exists(tmp_path / "x.json")


def test_sweep_starcraft_result_step(smax_runs, tmp_path, capsys):
    """sweep.py on a StarCraft grid (protocols = ["starcraft"]) whose runs are trained (the smoke runs copied into
    its runs/ folder): each result JSON holds the curve its run logged to eval.jsonl and the last round, no
    building numbers; no docs/results.md is written (that is the building report); a run without eval.jsonl is
    recorded as failed with the reason; the report is the StarCraft page, not docs/results.md."""
    import shutil

    from conftest import import_file

    sweep = import_file("sweep_under_test", "experiments/sweep.py")
    cwd, _ = smax_runs
    for name, rho in (("robust_vdn_rho", "0.0"), ("robust_qmix_rho", "0.01")):
        shutil.copytree(os.path.join(cwd, "runs", name), tmp_path / "runs" / "sc" / f"{name}__rho{rho}__seed1")
    os.remove(tmp_path / "runs" / "sc" / "robust_qmix_rho__rho0.01__seed1" / "eval.jsonl")
    (tmp_path / "sc.toml").write_text(
        '[defaults]\nflags = ["--env", "smax"]\n[eval]\nprotocols = ["starcraft"]\n'
        '[methods.robust_vdn_rho]\nscript = "algos/robust_vdn_rho.py"\nrho = [0.0]\nseeds = [1]\nminutes = 150\n'
        '[methods.robust_qmix_rho]\nscript = "algos/robust_qmix_rho.py"\nrho = [0.01]\nseeds = [1]\n'
    )
    results = tmp_path / "docs" / "results"
    args = sweep.Args(grid=str(tmp_path / "sc.toml"), workers=1, workdir=str(tmp_path), results_dir=str(results))
    assert sweep.main(args) == 1  # the run without eval.jsonl
    with open(os.path.join(cwd, "runs", "robust_vdn_rho", "eval.jsonl")) as f:
        points = [json.loads(line) for line in f]
    payload = json.loads((results / "sc" / "robust_vdn_rho__rho0.0__seed1.json").read_text())
    sc = payload["starcraft"]
    assert sc["env_steps"] == [p["step"] for p in points] and sc["final"] == points[-1]
    for key in ("win_rate_clean", "win_rate_noisy", "return_clean", "return_noisy"):
        assert sc[key] == [p[key] for p in points]
    assert "normalised_return" not in payload and payload["args"]["env"] == "smax"
    assert f"win rate clean {points[-1]['win_rate_clean']:.3f}" in capsys.readouterr().out
    failed = json.loads((results / "sc" / "failed" / "robust_qmix_rho__rho0.01__seed1.json").read_text())
    assert "eval.jsonl is missing" in failed["error"]
    assert not (tmp_path / "docs" / "results.md").exists()  # the building report is left alone ...
    page = (tmp_path / "docs" / "results_sc.md").read_text()  # ... the StarCraft one is written
    last = points[-1]
    assert f"| robust_vdn_rho | 0 | 1 | {last['step']:,} | {last['win_rate_clean']:.3f} +- 0.000 |" in page
    assert (tmp_path / "docs" / "results" / "sc_curves.png").stat().st_size > 0
