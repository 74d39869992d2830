"""experiments/sweep.py on tiny grids: both backends, skip-what-is-done, failures recorded, kill and rerun.

The jobs are the real scripts with a tiny budget (2-3 episodes of 20 steps) and eval.py with 3-step
episodes; every number the sweep writes is checked against eval.py run directly on the same model.pt.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT, import_file

TINY = ["--env", "building", "--save-model", "--torch-threads", "1", "--episode-steps", "20", "--learning-starts", "8",
        "--batch-size", "8", "--buffer-size", "200", "--log-every", "1"]


def grid_file(path, methods: str, episodes=2, extra=()):
    flags = ", ".join(f'"{f}"' for f in [*TINY, "--total-episodes", str(episodes), *extra])
    path.write_text(f'[defaults]\nflags = [{flags}]\n[eval]\nprotocols = ["paper-tables"]\nepisode_steps = 3\n{methods}')
    return str(path)


VDN = '[methods.vdn]\nscript = "algos/robust_vdn_rho.py"\nrho = [0.0]\nseeds = [1, 2]\npaper = "VDN non-robust"\n'
KILL_BUDGET = 100_000  # episodes: a run the kill test stops long before its end
BROKEN = '[methods.broken]\nscript = "algos/robust_vdn_tv.py"\nflags = ["--dual-loss", "cubic"]\nrho = [0.5]\nseeds = [1]\n'


@pytest.fixture(scope="module")
def sweep():
    return import_file("sweep_under_test", "experiments/sweep.py")


def eval_direct(eval_mod, model, tmp_path):
    out = eval_mod.main(eval_mod.Args(checkpoints=[model], protocol="paper-tables", episode_steps=3,
                                      out=str(tmp_path / f"direct_{abs(hash(model))}.json")))
    return {c: v["mean"] for c, v in next(iter(out["table"].values())).items()}


def test_local_pool_runs_records_failures_and_skips_finished_runs(sweep, eval_mod, tmp_path, capsys):
    grid = grid_file(tmp_path / "g.toml", VDN + BROKEN)
    results = tmp_path / "docs" / "results"
    args = sweep.Args(grid=grid, workers=2, workdir=str(tmp_path), results_dir=str(results))
    assert sweep.main(args) == 1  # one method cannot run: the sweep finishes the others and says so
    env_1 = []
    for seed in (1, 2):
        payload = json.loads((results / "g" / f"vdn__rho0.0__seed{seed}.json").read_text())
        env_1.append(payload["normalised_return"]["paper-tables"]["env_1"])
        model = tmp_path / "runs" / "g" / f"vdn__rho0.0__seed{seed}" / "model.pt"
        assert payload["seed"] == seed and payload["args"]["seed"] == seed and payload["args"]["rho"] == 0.0
        assert payload["normalised_return"]["paper-tables"] == pytest.approx(eval_direct(eval_mod, str(model), tmp_path))
        assert len(payload["curve"]["mean"]) == 1 and payload["curve"]["episodes"] == [2]
    failed = json.loads((results / "g" / "failed" / "broken__rho0.5__seed1.json").read_text())
    assert "--dual-loss must be one of linear, squared" in failed["error"]
    report = (tmp_path / "docs" / "results.md").read_text()
    # the vdn row: our env_1 cell = mean +- SE (population std / sqrt(2)) of the two seeds' values, computed
    # here; then the paper column: Table 1's published VDN non-robust, 0.877 +- 0.012 (the grid's paper key)
    mean, se = sum(env_1) / 2, abs(env_1[0] - env_1[1]) / 2 / 2**0.5
    assert f"| vdn | 0 | 2 | {mean:.3f} +- {se:.3f} | 0.877 +- 0.012 |" in report, report

    before = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "runs" / "g").rglob("model.pt")}
    json_before = {p: p.read_text() for p in (results / "g").glob("*.json")}
    capsys.readouterr()
    assert sweep.main(args) == 1  # the broken run is retried (and fails again); nothing else runs
    printed = capsys.readouterr().out
    assert "3 runs, 2 already done, 1 to run" in printed
    assert {p: os.stat(p).st_mtime_ns for p in (tmp_path / "runs" / "g").rglob("model.pt")} == before
    assert {p: p.read_text() for p in (results / "g").glob("*.json")} == json_before


def test_ray_backend_gives_the_local_result(sweep, eval_mod, tmp_path):
    pytest.importorskip("ray")
    grid = grid_file(tmp_path / "r.toml", VDN.replace("seeds = [1, 2]", "seeds = [3]"))
    results = tmp_path / "results"
    rc = sweep.main(sweep.Args(grid=grid, backend="ray", workers=1, workdir=str(tmp_path), results_dir=str(results), report=False))
    assert rc == 0
    payload = json.loads((results / "r" / "vdn__rho0.0__seed3.json").read_text())
    model = tmp_path / "runs" / "r" / "vdn__rho0.0__seed3" / "model.pt"
    assert payload["normalised_return"]["paper-tables"] == pytest.approx(eval_direct(eval_mod, str(model), tmp_path))


def test_killed_sweep_resumes_interrupted_runs(tmp_path):
    """SIGKILL the whole sweep once a run has written a checkpoint; the next start continues that run with
    --resume and ends with the weights of an uninterrupted run of the same command.

    No race with the run's end: the killed sweep's grid gives the run a budget it cannot reach before the kill
    (KILL_BUDGET episodes; the test kills as soon as the first checkpoint exists), and the restarted sweep's
    grid gives it the budget of the reference run, a few episodes past the checkpoint's (--total-episodes is a
    budget flag: --resume takes it from the command line, and it changes no number the run computes)."""
    methods = '[methods.vdn]\nscript = "algos/robust_vdn_rho.py"\nrho = [0.0]\nseeds = [4]\n'
    grid = grid_file(tmp_path / "k.toml", methods, episodes=KILL_BUDGET, extra=["--checkpoint-every", "1"])
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), grid, "--workers", "1", "--workdir", str(tmp_path),
           "--results-dir", str(tmp_path / "results"), "--no-report"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    run_dir = tmp_path / "runs" / "k" / "vdn__rho0.0__seed4"
    deadline = time.time() + SUBPROCESS_TIMEOUT
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training subprocess
    proc.wait()
    assert alive and (run_dir / "checkpoint.pt").exists(), proc.stdout.read().decode()
    assert not (run_dir / "model.pt").exists()
    killed_at = torch.load(run_dir / "checkpoint.pt", weights_only=False)["counters"]["episode"]
    assert 1 <= killed_at < KILL_BUDGET
    episodes = killed_at + 2  # the restarted sweep: two episodes after the checkpoint, then model.pt
    grid_file(tmp_path / "k.toml", methods, episodes=episodes, extra=["--checkpoint-every", "1"])
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "vdn__rho0.0__seed4: resume" in again.stdout
    log = (tmp_path / "runs" / "k" / "vdn__rho0.0__seed4.log").read_text()
    assert f"resumed runs/k/vdn__rho0.0__seed4/checkpoint.pt: episode {killed_at}," in log, log
    reference = subprocess.run([sys.executable, os.path.join(ROOT, "algos", "robust_vdn_rho.py"), *TINY, "--total-episodes",
                                str(episodes), "--rho", "0.0", "--seed", "4", "--run-name", "reference"], cwd=tmp_path,
                               capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert reference.returncode == 0, reference.stderr
    ours = torch.load(run_dir / "model.pt", weights_only=False)["q_network"]
    theirs = torch.load(tmp_path / "runs" / "reference" / "model.pt", weights_only=False)["q_network"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("text,expected", [
    ("[methods.a]\nrho = [0]\nseeds = [1]\n", "needs 'script'"),
    ('[methods.a]\nscript = "algos/nope.py"\nrho = [0]\nseeds = [1]\n', "no script 'algos/nope.py'"),
    ('[methods.a]\nscript = "algos/robust_vdn_rho.py"\nrho = [0]\nseeds = [1]\nsede = 3\n', "unknown keys ['sede']"),
    ('[eval]\nprotocols = ["tables"]\n[methods.a]\nscript = "algos/robust_vdn_rho.py"\nrho = [0]\nseeds = [1]\n', "protocols 'tables'"),
    ("not toml [", "is not valid TOML"),
])
def test_bad_grid_gives_one_error_line(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), str(path), "--dry-run",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert out.returncode != 0 and expected in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
