"""Checkpoints by time (issue 18, item 1): --checkpoint-minutes, with the episode rule and the StarCraft default.

* the rule (runs.Run.checkpoint_due, as Run.episode_end applies it): every --checkpoint-every episodes; with
  --checkpoint-minutes M > 0 also at the first episode end M minutes after the last checkpoint (or this process's
  start) and at the end of training; M = 0 and --checkpoint-every 0: none but Ctrl-C / SIGTERM (as before);
* a time-triggered checkpoint resumes bit for bit: robust_vdn_rho and robust_qmix_rho on the two-step matrix game
  with --checkpoint-every 0 and a fake clock (runs.checkpoint_clock advanced 25 s per episode, M = 1) checkpoints at
  episodes 3, 6, 9, ... and at the end (31); a run killed by SIGKILL in the middle of episode 11, after its time
  checkpoint of episode 9, and resumed, ends with a checkpoint.pt (networks, targets, optimiser, replay buffer,
  every RNG, episode and env step) and a model.pt equal to an uninterrupted run's;
* a finished run extended (--resume --total-steps, as the SMAX learning runs went from 1M to 2M steps) ends
  equal to one uninterrupted run of the longer budget;
* the flag: StarCraft runs default to time only (--checkpoint-every 0), building runs keep 50; a checkpoint
  written before the flag existed resumes with its default; it is a budget flag (a resumed run may change it);
  a negative value is refused with one line.

The schedules expected are computed here from the fake clock, not read from a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, import_file

import runs

SCRIPTS = ["robust_vdn_rho", "robust_qmix_rho"]  # without and with a mixer network
SCRIPT = os.path.join(ROOT, "algos", "robust_vdn_rho.py")  # the in-process tests of Run
EPISODES, SECONDS_PER_EPISODE, MINUTES = 31, 25.0, 1.0
KILL_AFTER_CHECKPOINT, KILL_STEPS = 9, 3  # SIGKILL 3 env steps after the checkpoint of episode 9: mid episode 11
EXTEND_FROM_STEPS = 30  # run d ends at env step 30 (episode 15); e extends it with --resume --total-steps 62
ARGS = [
    "--env",
    "matrix",
    "--train-config",
    "two-step",
    "--total-episodes",
    str(EPISODES),
    "--learning-starts",
    "4",
    "--batch-size",
    "8",
    "--buffer-size",
    "32",
    "--target-network-frequency",
    "7",
    "--checkpoint-every",
    "0",
    "--checkpoint-minutes",
    str(MINUTES),
    "--torch-threads",
    "1",
    "--log-every",
    "10",
    "--save-model",
    "--seed",
    "3",
]

# One process that imports torch once and runs each job in a forked child (own process, own exit status):
# runs.checkpoint_clock is a fake clock that MatrixGame.reset advances by SECONDS_PER_EPISODE; every checkpoint
# is announced on stdout; mode "kill": SIGKILL KILL_STEPS env steps after the checkpoint of episode KILL_AFTER.
RUNNER = r"""
import json, os, runpy, signal, sys
import envs
import runs

plan = json.load(open(sys.argv[1]))
clock = {"t": 0.0}
runs.checkpoint_clock = lambda: clock["t"]
reset, step, save = envs.MatrixGame.reset, envs.MatrixGame.step, runs.Run.save
left = {}


def reset_tick(self, day=0):
    clock["t"] += plan["seconds_per_episode"]
    return reset(self, day)


def step_or_die(self, actions):
    if "steps" in left:
        left["steps"] -= 1
        if left["steps"] < 0:
            os.kill(os.getpid(), signal.SIGKILL)
    return step(self, actions)


def save_logged(self):
    save(self)
    print(f"checkpoint at episode {self.episode}", flush=True)
    if plan["mode"] == "kill" and self.episode == plan["kill_after"]:
        left["steps"] = plan["kill_steps"]


envs.MatrixGame.reset, envs.MatrixGame.step, runs.Run.save = reset_tick, step_or_die, save_logged
for job in plan["jobs"]:
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        for fd, path in ((1, job["out"]), (2, job["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        plan["mode"] = job["mode"]
        sys.argv = [plan["script"], *job["args"]]
        code = 0
        try:
            runpy.run_path(plan["script"], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    job["status"] = status
json.dump(plan["jobs"], open(sys.argv[1] + ".done", "w"))
"""


def expected_schedule(first_episode: int) -> list[int]:
    """Episodes whose end writes a checkpoint, from the fake clock: the clock starts at 0 in each process and
    moves SECONDS_PER_EPISODE per episode; due when 60 * MINUTES seconds have passed since the last checkpoint
    (or the start), and at the last episode."""
    out, last, now = [], 0.0, 0.0
    for episode in range(first_episode + 1, EPISODES + 1):
        now += SECONDS_PER_EPISODE
        if now - last >= 60 * MINUTES or episode == EPISODES:
            out.append(episode)
            last = now
    return out


@pytest.fixture(scope="module", params=SCRIPTS)
def timed_runs(request, tmp_path_factory):
    """Uninterrupted run a; run b killed after its checkpoint of episode 9, then resumed (job c); run d finished at
    env step 30 by --total-steps, then extended to the end of a's budget (job e). -> (cwd, jobs, script)"""
    script = request.param
    cwd = str(tmp_path_factory.mktemp(f"ckpt_time_{script}"))
    jobs = [
        {"name": "a", "mode": "plain", "args": [*ARGS, "--run-name", "a"]},
        {"name": "b", "mode": "kill", "args": [*ARGS, "--run-name", "b"]},
        {"name": "c", "mode": "plain", "args": ["--resume", "runs/b"]},
        {"name": "d", "mode": "plain", "args": [*ARGS, "--total-steps", str(EXTEND_FROM_STEPS), "--run-name", "d"]},
        {"name": "e", "mode": "plain", "args": ["--resume", "runs/d", "--total-steps", str(2 * EPISODES)]},
    ]
    for job in jobs:
        job.update(cwd=cwd, out=os.path.join(cwd, job["name"] + ".out"), err=os.path.join(cwd, job["name"] + ".err"))
    plan = {
        "script": os.path.join(ROOT, "algos", f"{script}.py"),
        "seconds_per_episode": SECONDS_PER_EPISODE,
        "kill_after": KILL_AFTER_CHECKPOINT,
        "kill_steps": KILL_STEPS,
        "jobs": jobs,
    }
    path = os.path.join(cwd, "plan.json")
    with open(path, "w") as f:
        json.dump(plan, f)
    runner = os.path.join(cwd, "runner.py")
    with open(runner, "w") as f:
        f.write(RUNNER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, runner, path], cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(path + ".done") as f:
        done = {j["name"]: j for j in json.load(f)}
    for j in done.values():
        with open(j["out"]) as out, open(j["err"]) as err:
            j["stdout"], j["stderr"] = out.read(), err.read()
    return cwd, done, script


def schedule(out: str) -> list[int]:
    return [int(line.split()[-1]) for line in out.splitlines() if line.startswith("checkpoint at episode")]


def assert_same(a, b, where="checkpoint"):
    """Recursive bit-for-bit equality of checkpoint contents (tensors, arrays, RNG states, numbers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def test_time_checkpoints_follow_the_clock(timed_runs):
    """--checkpoint-every 0, one minute, 25 s per episode: checkpoints at episodes 3, 6, ..., 30 and at the end
    (31) in the uninterrupted run; the killed run wrote 3, 6, 9 and died by SIGKILL; the resumed one starts at
    episode 9 and, its clock restarting, checkpoints at 12, ..., 30, 31, the same episodes as the uninterrupted run."""
    _, done, _ = timed_runs
    a, b, c = done["a"], done["b"], done["c"]
    assert a["status"] == 0 and c["status"] == 0, a["stderr"][-2000:] + c["stderr"][-2000:]
    assert os.WIFSIGNALED(b["status"]) and os.WTERMSIG(b["status"]) == 9
    assert schedule(a["stdout"]) == expected_schedule(0) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31]
    assert schedule(b["stdout"]) == [3, 6, 9]
    assert "resumed runs/b/checkpoint.pt: episode 9" in c["stdout"]
    assert schedule(c["stdout"]) == expected_schedule(9) == [12, 15, 18, 21, 24, 27, 30, 31]


def test_time_checkpoint_resumes_bit_for_bit(timed_runs):
    """The resumed run's final checkpoint.pt equals the uninterrupted run's in every network, target, optimiser
    state, replay buffer array (with cached target values), RNG state (python, numpy, torch, the script's
    generator), episode and env step; model.pt too. Only run_name and resume, which name the run, differ in the args."""
    cwd, _, script = timed_runs

    def load(name, f):
        return torch.load(os.path.join(cwd, "runs", name, f), map_location="cpu", weights_only=True)

    a, c = load("a", "checkpoint.pt"), load("b", "checkpoint.pt")
    assert a["counters"] == {"episode": EPISODES, "global_step": 2 * EPISODES}  # two steps per episode
    assert int(a["state"]["optimizer"]["state"][0]["step"]) > 10  # gradient steps happened
    assert a["state"]["rb"]["version"] >= 3  # target copies (every 7 steps) happened before and after the kill
    for ckpt in (a, c):
        ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k not in ("run_name", "resume")}
    assert_same(a, c)
    ma, mc = load("a", "model.pt"), load("b", "model.pt")
    parts = [p for p in ("q_network", "mixer") if p in ma]
    assert parts == (["q_network", "mixer"] if "qmix" in script else ["q_network"])
    for part in parts:
        assert_same(ma[part], mc[part], f"model.{part}")


def test_finished_run_extended_equals_one_long_run(timed_runs):
    """A run that reached its --total-steps (d: 30 env steps, episode 15), continued with --resume runs/d
    --total-steps 62 (e), ends exactly where one uninterrupted run of 62 steps ends (a): the checkpoint written at
    the end of training is an ordinary episode-end checkpoint, and ending the run (model.pt, the last log line)
    draws no random number. This is how the SMAX learning runs were taken from 1M to 2M env steps
    (docs/starcraft.md); only the budget and the run's name differ in the args."""
    cwd, done, _ = timed_runs
    assert done["d"]["status"] == 0 and done["e"]["status"] == 0, done["d"]["stderr"][-2000:] + done["e"]["stderr"][-2000:]
    assert schedule(done["d"]["stdout"])[-1] == EXTEND_FROM_STEPS // 2  # d's last checkpoint: the end of its budget
    assert f"resumed runs/d/checkpoint.pt: episode {EXTEND_FROM_STEPS // 2}" in done["e"]["stdout"]

    def load(name, f):
        return torch.load(os.path.join(cwd, "runs", name, f), map_location="cpu", weights_only=True)

    a, e = load("a", "checkpoint.pt"), load("d", "checkpoint.pt")
    assert e["counters"] == a["counters"] == {"episode": EPISODES, "global_step": 2 * EPISODES}
    for ckpt in (a, e):
        ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k not in ("run_name", "resume", "total_steps")}
    assert_same(a, e)
    ma, me = load("a", "model.pt"), load("d", "model.pt")
    for part in [p for p in ("q_network", "mixer") if p in ma]:
        assert_same(ma[part], me[part], f"model.{part}")


def fake_run(tmp_path, monkeypatch, **args):
    """A runs.Run with a fake clock (now[0] seconds, 0 when its loop starts) and the given args, nothing to save
    (no object tracked). -> (run, now, due): due(episode, step) is whether Run.episode_end at that episode
    end writes a checkpoint (save replaced by a recorder)."""
    now = [0.0]
    monkeypatch.setattr(runs, "checkpoint_clock", lambda: now[0])
    base = {
        "checkpoint_every": 50,
        "checkpoint_minutes": 10.0,
        "total_episodes": 1000,
        "total_steps": 0,
        "log_every": 10**9,
        "resume": "",
    }
    run = runs.Run(str(tmp_path), types.SimpleNamespace(**{**base, **args}), SCRIPT)
    run.__enter__()  # the loop starts: the clock of --checkpoint-minutes too
    run.close()  # signal handlers back; checkpoint_due needs none
    saved = []

    def due(episode, step=0):
        before = len(saved)
        run.save = lambda: saved.append(episode)
        try:
            run.episode_end(episode, step, 0.0, 0.0)
        finally:
            del run.save
        return len(saved) > before

    return run, now, due


def test_checkpoint_due_rule(tmp_path, monkeypatch):
    """The rule on its own: episodes (every 50: episode 50 yes, 49 no); time (due at 600 s = 10 minutes since the
    start, not at 599 s; then counted from the last checkpoint); the end of training (the last episode, or
    --total-steps reached) when minutes > 0; with --checkpoint-minutes 0 only the episode rule;
    --checkpoint-every 0 (StarCraft): time and the end only."""
    run, now, due = fake_run(tmp_path, monkeypatch)
    assert due(50) and not due(49)
    now[0] = 599.0
    assert not due(49)
    now[0] = 600.0
    assert due(49)
    run.last_save_time = 600.0  # what save() records
    now[0] = 1199.0
    assert not due(51) and due(1000)
    run, now, due = fake_run(tmp_path, monkeypatch, checkpoint_every=0, total_steps=5000)
    now[0] = 599.0
    assert not due(50) and not due(49) and due(49, 5000)
    now[0] = 1e9
    assert due(1)
    run, now, due = fake_run(tmp_path, monkeypatch, checkpoint_minutes=0.0, total_episodes=999)
    now[0] = 1e9
    assert due(50) and not due(49) and not due(999)


def test_save_restarts_the_clock(tmp_path, monkeypatch):
    """Run.save records the time of the checkpoint: the next one by time is due 10 minutes later."""
    run, now, due = fake_run(tmp_path, monkeypatch, checkpoint_every=0)
    run.args.__dict__.update(exp_name="x")
    now[0] = 700.0
    run.episode, run.global_step = 3, 30
    run.save()
    assert run.last_save_time == 700.0 and os.path.isfile(os.path.join(tmp_path, "checkpoint.pt"))
    now[0] = 1299.0
    assert not due(4, 40)
    now[0] = 1300.0
    assert due(4, 40)


def test_starcraft_defaults_to_time_only_building_keeps_50(vdn):
    """envs.apply_env_defaults: --env smax (StarCraft) turns --checkpoint-every into 0 (time only, every 10
    minutes) when left at its default, building keeps 50; an explicit value other than the default stays."""
    import envs

    for env, every in (("smax", 0), ("building", 50), ("matrix", 0)):
        args = vdn.Args(env=env)
        envs.apply_env_defaults(args, vdn.Args)
        assert (args.checkpoint_every, args.checkpoint_minutes) == (every, 10.0), env
    args = vdn.Args(env="smax", checkpoint_every=7, checkpoint_minutes=2.5)
    envs.apply_env_defaults(args, vdn.Args)
    assert (args.checkpoint_every, args.checkpoint_minutes) == (7, 2.5)


def test_old_checkpoint_resumes_and_minutes_is_a_budget_flag(timed_runs, tmp_path):
    """A checkpoint written before --checkpoint-minutes existed (the key removed from its args) resumes with the
    flag's default (10) or the command line's value; with a checkpoint that holds the flag (1 minute), a resumed
    run may set another (budget flag: how often a run checkpoints), and a flag that is not a budget flag given
    with another value is still refused."""
    cwd, _, script = timed_runs
    ckpt = torch.load(os.path.join(cwd, "runs", "a", "checkpoint.pt"), map_location="cpu", weights_only=True)
    mod, path = _script_module(script), os.path.join(ROOT, "algos", f"{script}.py")
    old = dict(ckpt, args={k: v for k, v in ckpt["args"].items() if k != "checkpoint_minutes"})
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "checkpoint.pt")
    for argv, minutes in (([], 10.0), (["--checkpoint-minutes", "4"], 4.0)):
        args = runs.parse_args(mod.Args, path, mod.check_args, ["--resume", str(tmp_path / "old"), *argv])
        assert args.checkpoint_minutes == minutes and args.env == "matrix" and args.seed == 3
    (tmp_path / "new").mkdir()
    torch.save(ckpt, tmp_path / "new" / "checkpoint.pt")
    args = runs.parse_args(mod.Args, path, mod.check_args, ["--resume", str(tmp_path / "new"), "--checkpoint-minutes", "30"])
    assert args.checkpoint_minutes == 30.0
    args = runs.parse_args(mod.Args, path, mod.check_args, ["--resume", str(tmp_path / "new")])  # left out: the checkpoint's
    assert args.checkpoint_minutes == MINUTES
    with pytest.raises(SystemExit):
        runs.parse_args(mod.Args, path, mod.check_args, ["--resume", str(tmp_path / "new"), "--gamma", "0.5"])


def test_negative_minutes_refused(capsys):
    """--checkpoint-minutes -1: one line naming the flag, exit 2 (runs.check_counts, before anything is built)."""
    for script in SCRIPTS:
        mod = _script_module(script)
        with pytest.raises(SystemExit) as e:
            runs.check_counts(mod.Args(checkpoint_minutes=-1.0))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --checkpoint-minutes must be >= 0"), (script, err)


def _script_module(script):
    return import_file(f"{script}_under_test", f"algos/{script}.py")
