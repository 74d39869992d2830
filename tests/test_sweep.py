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

TINY = [
    "--env",
    "building",
    "--save-model",
    "--torch-threads",
    "1",
    "--episode-steps",
    "20",
    "--learning-starts",
    "8",
    "--batch-size",
    "8",
    "--buffer-size",
    "200",
    "--log-every",
    "1",
]


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
    out = eval_mod.main(
        eval_mod.Args(
            checkpoints=[model],
            protocol="paper-tables",
            episode_steps=3,
            out=str(tmp_path / f"direct_{abs(hash(model))}.json"),
        )
    )
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
    rc = sweep.main(
        sweep.Args(grid=grid, backend="ray", workers=1, workdir=str(tmp_path), results_dir=str(results), report=False)
    )
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
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "sweep.py"),
        grid,
        "--workers",
        "1",
        "--workdir",
        str(tmp_path),
        "--results-dir",
        str(tmp_path / "results"),
        "--no-report",
    ]
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
    killed_at = torch.load(run_dir / "checkpoint.pt", weights_only=True)["counters"]["episode"]
    assert 1 <= killed_at < KILL_BUDGET
    episodes = killed_at + 2  # the restarted sweep: two episodes after the checkpoint, then model.pt
    grid_file(tmp_path / "k.toml", methods, episodes=episodes, extra=["--checkpoint-every", "1"])
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "vdn__rho0.0__seed4: resume" in again.stdout
    log = (tmp_path / "runs" / "k" / "vdn__rho0.0__seed4.log").read_text()
    assert f"resumed runs/k/vdn__rho0.0__seed4/checkpoint.pt: episode {killed_at}," in log, log
    reference = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "algos", "robust_vdn_rho.py"),
            *TINY,
            "--total-episodes",
            str(episodes),
            "--rho",
            "0.0",
            "--seed",
            "4",
            "--run-name",
            "reference",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert reference.returncode == 0, reference.stderr
    ours = torch.load(run_dir / "model.pt", weights_only=True)["q_network"]
    theirs = torch.load(tmp_path / "runs" / "reference" / "model.pt", weights_only=True)["q_network"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[methods.a]\nrho = [0]\nseeds = [1]\n", "needs 'script'"),
        ('[methods.a]\nscript = "algos/nope.py"\nrho = [0]\nseeds = [1]\n', "no script 'algos/nope.py'"),
        ('[methods.a]\nscript = "algos/robust_vdn_rho.py"\nrho = [0]\nseeds = [1]\nsede = 3\n', "unknown keys ['sede']"),
        (
            '[eval]\nprotocols = ["tables"]\n[methods.a]\nscript = "algos/robust_vdn_rho.py"\nrho = [0]\nseeds = [1]\n',
            "protocols 'tables'",
        ),
        ("not toml [", "is not valid TOML"),
        (
            '[methods.a]\nscript = "algos/robust_vdn_rho.py"\nrho = [0]\nseeds = [1]\nminutes = "soon"\n',
            "method 'a': minutes must be a positive number of minutes (got 'soon')",
        ),
        (
            '[methods.a]\nscript = "algos/robust_vdn_rho.py"\nrho = [0]\nseeds = [1]\n[stages.s]\nscript = "algos/groupdr_vdn.py"\nminutes = -5\n',
            "stage 's': minutes must be a positive number of minutes (got -5)",
        ),
    ],
)
def test_bad_grid_gives_one_error_line(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), str(path), "--dry-run", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert out.returncode != 0 and expected in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ------------------------------- stages: dependent jobs (GroupDR) -------------------------------

GDR_TINY = [
    "--save-model",
    "--torch-threads",
    "1",
    "--episode-steps",
    "20",
    "--learning-starts",
    "8",
    "--batch-size",
    "8",
    "--buffer-size",
    "200",
    "--train-configs",
    "env_1,env_2",
]


def toml_list(flags) -> str:
    return "[" + ", ".join(f'"{f}"' for f in flags) + "]"


def groupdr_grid(path, behaviour_episodes: int) -> str:
    """The GroupDR pipeline in three kinds of job: the behaviour policy (stage), the estimator (stage, needs it),
    a GroupDR method with 2 seeds (needs the estimator, no --rho); tiny budgets, configs env_1 and env_2."""
    behaviour = [
        "--observed-reward",
        "--single-coin",
        *GDR_TINY,
        "--total-episodes",
        str(behaviour_episodes),
        "--checkpoint-every",
        "1",
    ]
    estimator = [
        "--configs",
        "env_1,env_2",
        "--episodes",
        "2",
        "--episode-steps",
        "20",
        "--batch-size",
        "8",
        "--torch-threads",
        "1",
    ]
    path.write_text(
        f"[defaults]\nflags = {toml_list([*TINY, '--total-episodes', '2'])}\n"
        '[eval]\nprotocols = ["paper-tables"]\nepisode_steps = 3\n'
        f'[methods.gvdn]\nscript = "algos/groupdr_vdn.py"\nflags = ["--single-coin", "--train-configs", "env_1,env_2"]\n'
        f'rho = [0]\nrho_flag = false\nseeds = [1, 2]\npaper = "VDN GroupDR"\nneeds = {{ "--estimator-checkpoint" = "est" }}\n'
        f'[stages.est]\nscript = "algos/groupdr_estimator.py"\nflags = {toml_list(estimator)}\noutput = "estimator.pt"\n'
        f'needs = {{ "--behaviour-checkpoint" = "beh" }}\n'  # declared before the stage it needs: the order is resolved
        f'[stages.beh]\nscript = "algos/groupdr_vdn.py"\nflags = {toml_list(behaviour)}\n'
    )
    return str(path)


def test_stage_tables_resolve_into_dependent_jobs(sweep, tmp_path, capsys):
    """load_grid: stages first in dependency order (est is declared before beh, which it needs), each stage's
    needs become `--flag runs/<grid>/<stage>/<output>`, stages get no [defaults] flags and no --rho; the method's
    jobs get the estimator path and, with rho_flag = false, no --rho (their names keep rho 0). The dry run
    says which job waits for which stage; --only gvdn brings in both stages."""
    grid = groupdr_grid(tmp_path / "s.toml", 2)
    _name, jobs = sweep.load_grid(grid)
    assert [(j.name, j.stage) for j in jobs] == [
        ("beh", True),
        ("est", True),
        ("gvdn__rho0.0__seed1", False),
        ("gvdn__rho0.0__seed2", False),
    ]
    beh, est, g1, _ = jobs
    assert est.needs == ["beh"] and g1.needs == ["est"] and beh.needs == [] and est.output == "estimator.pt"
    assert est.flags[-2:] == ["--behaviour-checkpoint", os.path.join("runs", "s", "beh", "model.pt")]
    assert g1.flags[-2:] == ["--estimator-checkpoint", os.path.join("runs", "s", "est", "estimator.pt")]
    assert "--env" not in beh.flags and "--env" in g1.flags  # [defaults] flags go to methods only
    cmd = g1.train_command(False)
    assert "--rho" not in cmd and cmd[-4:] == ["--seed", "1", "--run-name", "s/gvdn__rho0.0__seed1"]
    assert "--rho" not in est.train_command(False) and est.train_command(False)[-2:] == ["--run-name", "s/est"]
    capsys.readouterr()
    assert (
        sweep.main(sweep.Args(grid=grid, dry_run=True, workdir=str(tmp_path), results_dir=str(tmp_path / "r"), only="gvdn"))
        == 0
    )
    out = capsys.readouterr().out
    assert "2 runs, 0 already done, 2 to run; 2 stages, 2 to run" in out
    assert "  beh: stage, new  " in out and "  est: stage, new (waits for beh)" in out
    assert "  gvdn__rho0.0__seed2: new (waits for est)" in out


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            (
                '[stages.a]\nscript = "algos/groupdr_vdn.py"\nneeds = { "--x" = "b" }\n[stages.b]\nscript = "algos/groupdr_vdn.py"\n'
                'needs = { "--y" = "a" }\n'
            ),
            "need each other (a cycle)",
        ),
        ('[stages.a]\nscript = "algos/groupdr_vdn.py"\nneeds = { "--x" = "nope" }\n', "needs stage 'nope'"),
        ('[stages.a]\nscript = "algos/groupdr_vdn.py"\nsede = 1\n', "unknown keys ['sede']"),
        ("[stages.a]\nflags = []\n", "stage 'a' needs 'script'"),
        ('[stages.m]\nscript = "algos/groupdr_vdn.py"\n', "has the name of a method"),
        ('[stages.a]\nscript = "algos/groupdr_vdn.py"\nneeds = { "x" = "a" }\n', "is not a flag"),
    ],
)
def test_bad_stage_tables_give_one_error_line(sweep, tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text('[methods.m]\nscript = "algos/robust_vdn_rho.py"\nrho = [0]\nseeds = [1]\n' + text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sweep.load_grid(str(path))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: grid:") and expected in err[0], err


def test_failed_stage_fails_its_dependents_without_running_them(sweep, tmp_path, capsys):
    """A stage that cannot run (the estimator without --behaviour-checkpoint) is recorded as failed, and the
    method that needs it is recorded as failed with the reason, without a run folder: nothing trains on a
    missing input. The independent method runs."""
    grid = tmp_path / "f.toml"
    grid.write_text(
        f'[defaults]\nflags = {toml_list([*TINY, "--total-episodes", "1"])}\n[eval]\nprotocols = ["paper-tables"]\n'
        'episode_steps = 3\n[stages.est]\nscript = "algos/groupdr_estimator.py"\nflags = ["--torch-threads", "1"]\n'
        'output = "estimator.pt"\n[methods.gvdn]\nscript = "algos/groupdr_vdn.py"\nrho = [0]\nrho_flag = false\nseeds = [1]\n'
        'needs = { "--estimator-checkpoint" = "est" }\n'
    )
    results = tmp_path / "results"
    args = sweep.Args(grid=str(grid), workers=2, workdir=str(tmp_path), results_dir=str(results), report=False)
    assert sweep.main(args) == 1
    failed_stage = json.loads((results / "f" / "failed" / "est.json").read_text())
    assert "--behaviour-checkpoint is required" in failed_stage["error"]
    failed_run = json.loads((results / "f" / "failed" / "gvdn__rho0.0__seed1.json").read_text())
    assert "needs stage est, which failed" in failed_run["error"]
    assert not (tmp_path / "runs" / "f" / "gvdn__rho0.0__seed1").exists()
    assert not list((results / "f").glob("*.json"))


def test_groupdr_pipeline_runs_in_dependency_order_and_resumes_after_a_kill(sweep, tmp_path, capsys):
    """The GroupDR grid (behaviour -> estimator -> 2 GroupDR seeds), as a sweep subprocess with 2 workers, is
    SIGKILLed once the behaviour stage has written its first checkpoint (a budget of 1000 episodes: it cannot
    have finished). Nothing that needs it has started (no estimator or GroupDR run folder). The sweep started
    again (the grid's behaviour budget now 2 episodes: a budget flag, so the checkpoint's run continues)
    resumes the behaviour stage, then runs the estimator on its model.pt, then both GroupDR seeds on the one
    estimator.pt: each input file is older than the run that reads it, the estimator records the behaviour
    checkpoint it used, every GroupDR run the estimator path; a third start runs nothing."""
    grid = groupdr_grid(tmp_path / "k.toml", 1000)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "sweep.py"),
        grid,
        "--workers",
        "2",
        "--workdir",
        str(tmp_path),
        "--results-dir",
        str(tmp_path / "results"),
        "--no-report",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    runs = tmp_path / "runs" / "k"
    deadline = time.time() + 300
    while not (runs / "beh" / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training subprocess
    proc.wait()
    assert (runs / "beh" / "checkpoint.pt").exists(), proc.stdout.read().decode()
    assert not (runs / "beh" / "model.pt").exists()
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["beh"]  # the estimator and GroupDR runs waited

    groupdr_grid(tmp_path / "k.toml", 2)
    args = sweep.Args(grid=grid, workers=2, workdir=str(tmp_path), results_dir=str(tmp_path / "results"), report=False)
    capsys.readouterr()
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs, 0 already done, 2 to run; 2 stages, 2 to run" in out
    assert "  beh: stage, resume" in out and "  est: stage, new (waits for beh)" in out
    behaviour, estimator = runs / "beh" / "model.pt", runs / "est" / "estimator.pt"
    assert torch.load(behaviour, weights_only=True)["args"]["total_episodes"] == 2
    assert "resumed runs/k/beh/checkpoint.pt" in (runs / "beh.log").read_text()  # continued, not restarted
    assert behaviour.stat().st_mtime_ns <= (runs / "est" / "args.json").stat().st_mtime_ns
    ckpt = torch.load(estimator, weights_only=False)
    assert ckpt["behaviour"]["checkpoint"] == str(behaviour) and ckpt["configs"] == ["env_1", "env_2"]
    for seed in (1, 2):
        run = runs / f"gvdn__rho0.0__seed{seed}"
        assert estimator.stat().st_mtime_ns <= (run / "args.json").stat().st_mtime_ns
        assert torch.load(run / "model.pt", weights_only=True)["args"]["estimator_checkpoint"] == "runs/k/est/estimator.pt"
        payload = json.loads((tmp_path / "results" / "k" / f"gvdn__rho0.0__seed{seed}.json").read_text())
        assert payload["rho"] == 0.0 and payload["paper"] == "VDN GroupDR" and "--rho" not in payload["command"].split()
        assert payload["flags"][-2:] == ["--estimator-checkpoint", "runs/k/est/estimator.pt"]
        assert set(payload["normalised_return"]["paper-tables"]) == {"env_1", "env_6"}
        assert payload["inputs"] == {"est": sweep.tensor_hash(str(estimator))}  # both seeds read this estimator
    # one record per stage build: the resumed behaviour stage, then the estimator, with the hashes of their outputs
    for stage, output, resumed in (("beh", behaviour, True), ("est", estimator, False)):
        (build,) = json.loads((tmp_path / "results" / "k" / "stages" / f"{stage}.json").read_text())["builds"]
        assert build["tensor_hash"] == sweep.tensor_hash(str(output)) and build["resumed"] is resumed
        assert build["train_seconds"] > 0 and build["output"] == os.path.join("runs", "k", stage, output.name)
    assert sorted(p.name for p in (tmp_path / "results" / "k").glob("*.json")) == [
        "gvdn__rho0.0__seed1.json",
        "gvdn__rho0.0__seed2.json",
    ]  # stages write no result JSON

    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*.pt")}
    assert sweep.main(args) == 0
    assert "2 runs, 2 already done, 0 to run; 2 stages, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.pt")} == before


# ------------------------------- --deadline: start only what can finish -------------------------------


@pytest.mark.parametrize("text", ["25:00", "7", "+x", "+-5", "12:60", "+inf"])
def test_bad_deadline_gives_one_error_line(tmp_path, text):
    grid = grid_file(tmp_path / "d.toml", VDN)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), grid, "--dry-run", "--deadline", text],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: --deadline must be HH:MM (local time) or +MINUTES (got '{text}')"


def test_parse_deadline(sweep):
    now = time.mktime((2026, 12, 5, 10, 30, 0, 0, 0, -1))  # 10:30 local time
    assert sweep.parse_deadline("", now) is None
    assert sweep.parse_deadline("+90", now) == now + 5400
    assert sweep.parse_deadline("12:00", now) == now + 5400  # later today
    assert sweep.parse_deadline("09:30", now) == now + 23 * 3600  # already past today: tomorrow's


def test_expected_minutes_from_earlier_results(sweep, tmp_path):
    """1.1 x the median train_seconds of the results of the job's script, all its methods pooled (+3 min); with fewer
    than 3 of its own, of all the grid's results; else the grid's `minutes`, else --unknown-minutes; a stage (no
    results) takes its `minutes`."""
    out = tmp_path / "g"
    out.mkdir()
    for i, (method, script, seconds) in enumerate(
        [("a", "algos/x.py", 600), ("a", "algos/x.py", 1200), ("f", "algos/x.py", 6000), ("b", "algos/y.py", 1800)]
    ):
        (out / f"r{i}.json").write_text(json.dumps({"method": method, "script": script, "train_seconds": seconds}))
    jobs = [
        sweep.Job("g", "a", "algos/x.py", [], 0.0, 1, []),  # its script: median of 600, 1200, 6000 = 1200 s
        sweep.Job("g", "f", "algos/x.py", [], 0.0, 1, []),  # f's own result alone (6000 s) does not decide: 1200 s
        sweep.Job("g", "c", "algos/y.py", [], 0.0, 1, [], minutes=5),  # y.py has 1 result: the grid's median (1500 s)
        sweep.Job("g", "d", "algos/z.py", [], 0.0, 1, [], minutes=7),  # nothing known: the grid's minutes
        sweep.Job("g", "e", "algos/z.py", [], 0.0, 1, []),  # nothing at all: unknown
        sweep.Job("g", "s", "algos/x.py", [], 0.0, 1, [], stage=True, minutes=9),  # a stage with no build: its minutes
        sweep.Job("g", "t", "algos/x.py", [], 0.0, 1, [], stage=True, minutes=9),  # its whole builds: median 600 s
    ]
    (out / "stages").mkdir()
    builds = [{"train_seconds": 600, "resumed": False}, {"train_seconds": 60, "resumed": True}]
    (out / "stages" / "t.json").write_text(json.dumps({"stage": "t", "builds": builds}))
    got = sweep.expected_minutes(jobs, str(out), 42.0)
    assert got == pytest.approx(
        {j.name: m for j, m in zip(jobs, [1.1 * 20 + 3, 1.1 * 20 + 3, 1.1 * 25 + 3, 7.0, 42.0, 9.0, 1.1 * 10 + 3])}
    )


def test_deadline_starts_only_the_jobs_that_fit(sweep, tmp_path, capsys):
    """With a deadline 30 minutes away: the method whose grid `minutes` fit runs; the one expected to take
    longer (another script: no result of the sweep updates its estimate), and the stage chain whose first stage would not finish, with the run that needs it, are not
    started (no run folder, no result, no failed record) and are named; the sweep exits 0. The next start
    without a deadline runs them."""
    short = VDN.replace("seeds = [1, 2]", "seeds = [1]") + "minutes = 1\n"
    long = (
        '[methods.slow]\nscript = "algos/robust_qmix_rho.py"\nrho = [0.0]\nseeds = [1]\nminutes = 600\n'
        '[methods.chained]\nscript = "algos/robust_vdn_rho.py"\nrho = [0.0]\nseeds = [1]\nminutes = 1\n'
        'needs = { "--estimator-checkpoint" = "est" }\n'
        '[stages.est]\nscript = "algos/groupdr_estimator.py"\nminutes = 5\nneeds = { "--behaviour-checkpoint" = "beh" }\n'
        '[stages.beh]\nscript = "algos/groupdr_vdn.py"\nminutes = 120\n'
    )
    grid = grid_file(tmp_path / "d.toml", short + long)
    results = tmp_path / "results"
    args = sweep.Args(grid=grid, workers=2, workdir=str(tmp_path), results_dir=str(results), report=False, deadline="+30")
    capsys.readouterr()
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "slow__rho0.0__seed1: new ~600 min (would not finish by the deadline)" in out
    assert "4 jobs not started: they would not finish by the deadline" in out
    assert out.strip().endswith("grid d: 1 of 3 runs have results")
    for name in ("beh", "est", "slow__rho0.0__seed1", "chained__rho0.0__seed1"):
        assert name in out.split("jobs not started")[1]
        assert not (tmp_path / "runs" / "d" / name).exists()
    assert sorted(p.name for p in (results / "d").iterdir()) == ["vdn__rho0.0__seed1.json"]  # no failed/
    # a later start without a deadline picks up exactly what was left (dry run: nothing is trained here)
    assert sweep.main(sweep.Args(grid=grid, workdir=str(tmp_path), results_dir=str(results), dry_run=True)) == 0
    assert "3 runs, 1 already done, 2 to run; 2 stages, 2 to run" in capsys.readouterr().out


def test_tensor_hash_reads_only_the_tensors(sweep, tmp_path):
    w = {"net": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}, "fit": {"wall_seconds": 12.5}}
    torch.save(w, tmp_path / "a.pt")
    torch.save({**w, "fit": {"wall_seconds": 99.0}}, tmp_path / "b.pt")  # other wall time, same weights
    torch.save({**w, "net": {**w["net"], "b": torch.tensor([0.0, 1e-7])}}, tmp_path / "c.pt")
    torch.save({**w, "net": {"w": w["net"]["w"].reshape(3, 2), "b": w["net"]["b"]}}, tmp_path / "d.pt")  # same bytes
    a, b, c, d = (sweep.tensor_hash(str(tmp_path / f"{x}.pt")) for x in "abcd")
    assert a == b and len({a, c, d}) == 3 and len(a) == 64
    (tmp_path / "e.pt").write_bytes(b"not a checkpoint")
    assert sweep.tensor_hash(str(tmp_path / "e.pt")).startswith("unreadable")


def test_deadline_estimates_follow_the_results_of_the_sweep(sweep, tmp_path, capsys):
    """A method with no result of its own is planned with its script's results once one exists: b (grid estimate
    600 min, same script as a) does not fit a 30-minute deadline at the start, but a's tiny run, finished first,
    sets the estimate of the script, and b then runs in the same sweep."""
    methods = (
        '[methods.a]\nscript = "algos/robust_vdn_rho.py"\nrho = [0.0]\nseeds = [1]\nminutes = 1\n'
        '[methods.b]\nscript = "algos/robust_vdn_rho.py"\nrho = [0.0]\nseeds = [1]\nminutes = 600\n'
    )
    grid = grid_file(tmp_path / "f.toml", methods)
    results = tmp_path / "results"
    args = sweep.Args(grid=grid, workers=1, workdir=str(tmp_path), results_dir=str(results), report=False, deadline="+30")
    capsys.readouterr()
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "b__rho0.0__seed1: new ~600 min (would not finish by the deadline)" in out and "not started" not in out
    assert sorted(p.name for p in (results / "f").glob("*.json")) == ["a__rho0.0__seed1.json", "b__rho0.0__seed1.json"]


def test_training_seconds_leave_out_the_pause_of_a_resumed_run(sweep, tmp_path):
    """train_seconds of a run resumed hours after its checkpoint (two event files, as runs.Run writes them) counts
    the time spent training only: 3 episodes 2 s apart, a restart 2 h later, 2 more episodes 5 s apart -> 4 + 5 s;
    an uninterrupted run keeps its first-to-last time (a 9-minute gap inside it, e.g. a slow evaluation, counts)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def write(folder, points, suffix):
        w = EventFileWriter(str(folder), filename_suffix=suffix)
        for step, wall in points:
            summary = Summary(value=[Summary.Value(tag="charts/episodic_return", simple_value=1.0)])
            w.add_event(Event(wall_time=wall, step=step, summary=summary))
        w.close()

    t0 = 1.8e9
    resumed = tmp_path / "resumed"
    write(resumed, [(10, t0), (20, t0 + 2), (30, t0 + 4)], ".a")
    write(resumed, [(40, t0 + 7200), (50, t0 + 7205)], ".b")
    assert sweep.training_curve(str(resumed))["wall_seconds"] == 9.0
    plain = tmp_path / "plain"
    write(plain, [(10, t0), (20, t0 + 540), (30, t0 + 541)], ".a")
    assert sweep.training_curve(str(plain))["wall_seconds"] == 541.0
    assert sweep.training_seconds([]) == 0.0 and sweep.training_seconds([t0]) == 0.0
