"""Long runs survive faults (issue 10): checkpoints, exact --resume, Ctrl-C / SIGTERM, NaN guard, bad flags.

* resume is exact, for all nine scripts: a run killed with SIGKILL in the middle of an episode after
  its checkpoint and continued with --resume ends in exactly the state of an uninterrupted run: the
  final checkpoint.pt (every network and target, every optimiser, the replay buffer with its cached
  target values and version, every RNG state, the episode and env step) and model.pt are equal bit for bit; the
  resumed process starts at the checkpoint's episode (not from scratch); TensorBoard holds the same
  points as the uninterrupted run's, none twice, although the killed process logged past its checkpoint;
* SIGTERM (a real signal from another process): the episode finishes, a checkpoint is written, the
  resume command printed, exit 143;
* NaN guard: a diverging run (--learning-rate 1e30) stops with one stderr line naming the episode and
  the last good checkpoint, exit 3, no model.pt, the checkpoint finite;
* --resume with a differing flag: one line naming it; budget flags change, left-out flags come from
  the checkpoint;
* bad flags: every count / frequency flag of every script, in-process (check_args on an Args), one
  line "error: --flag must be ...", exit != 0; and the run folder is created only after the checks.

The training runs are two subprocesses (conftest.run_parallel) started when the session has collected
its tests (start_background_jobs), so they overlap the in-process tests of the other files. Each runs
its runs one after the other as forked children (torch, sustaingym and the C++ kernels are imported
once): every run is still a process of its own, and the killed ones die by a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import runpy
import shutil
import sys
import tempfile
import threading
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT, describe, import_file, run_parallel

import runs

SCRIPTS = [
    "robust_vdn_rho",
    "robust_vdn_tv",
    "robust_qmix_rho",
    "robust_qmix_tv",
    "robust_qtran_rho",
    "robust_qtran_tv",
    "groupdr_vdn",
    "groupdr_qmix",
    "groupdr_qtran",
]
GROUPDR_CONFIGS = ["env_1", "env_2"]
EPISODE_STEPS, EPISODES, EVERY = 12, 4, 2
# target copies every 15 steps (the cached target values change version), a buffer that wraps
TINY = [
    "--total-episodes",
    str(EPISODES),
    "--episode-steps",
    str(EPISODE_STEPS),
    "--learning-starts",
    "8",
    "--batch-size",
    "8",
    "--buffer-size",
    "32",
    "--target-network-frequency",
    "15",
    "--torch-threads",
    "1",
    "--log-every",
    "1",
    "--checkpoint-every",
    str(EVERY),
    "--save-model",
]
KILL_AFTER = EPISODE_STEPS + 5  # env steps after the checkpoint of episode 2: the middle of episode 4
TERM_EPISODES = 1_000_000  # the SIGTERM run's budget: it cannot end on its own before the signal, however slow
NAN_SCRIPTS = ["robust_vdn_rho", "robust_qtran_tv"]

# The runner: one process that runs a list of jobs, each in a forked child (own process, own exit status)
# with its stdout / stderr in files. mode "kill": the child dies by SIGKILL KILL_AFTER env steps after
# its first checkpoint, its TensorBoard events flushed first (as a 120 s flush could have done); mode
# "term": this process sends the child SIGTERM once its first progress line is out (no deadline: the run's
# budget is one it cannot finish, and conftest's hard cap on the runner ends a hung job).
RUNNER = r"""
import json, os, runpy, signal, sys, time, traceback
import envs, fused, runs
from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imported once, before the forks)

plan = json.load(open(sys.argv[1]))
for config in plan["warm"]:
    envs.make_env("building", config)  # sustaingym's ParameterGenerator, cached before the forks
fused.kernel()


def child(job):
    os.chdir(job["cwd"])
    for fd, path in ((1, job["out"]), (2, job["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    if job["mode"] == "kill":
        left = {}
        save, step = runs.Run.save, envs.BuildingTask.step

        def save_then_arm(self):
            save(self)
            left.setdefault("steps", job["kill_after"])
            left["writer"] = self.writer

        def step_or_die(self, actions):
            if "steps" in left:
                left["steps"] -= 1
                if left["steps"] < 0:
                    left["writer"].flush()
                    sys.stdout.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return step(self, actions)

        runs.Run.save, envs.BuildingTask.step = save_then_arm, step_or_die
    sys.argv = job["argv"]
    code = 0
    try:
        runpy.run_path(job["argv"][0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


results = {}
for job in plan["jobs"]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(job)
    status = None
    if job["mode"] == "term":
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif os.path.exists(job["out"]) and "episode 1/" in open(job["out"]).read():
                os.kill(pid, signal.SIGTERM)
                break
            else:
                time.sleep(0.05)
    if status is None:
        status = os.waitpid(pid, 0)[1]
    results[job["name"]] = os.waitstatus_to_exitcode(status)
print("RESULTS " + json.dumps(results), flush=True)
"""

_BG: dict = {}
_BG_LOCK = threading.Lock()


def write_estimator(path: str) -> None:
    """A GroupDR estimator checkpoint with heads env_1, env_2 (random weights: only its format matters here)."""
    gdr = import_file("groupdr_reward", "algos/groupdr_reward.py")
    with torch.random.fork_rng():  # the session's torch RNG stays as it was
        torch.manual_seed(0)
        net = gdr.RewardEstimator(10, 6, 200, len(GROUPDR_CONFIGS), hidden_dim=16, time_norm=288.0)
        net.set_normalisation(torch.randn(50, 10) * 5 + 20, torch.randn(50) * 10 - 50)
    torch.save(
        {
            "format": gdr.ESTIMATOR_FORMAT,
            "configs": GROUPDR_CONFIGS,
            "n_agents": 6,
            "n_actions": 200,
            "state_dim": 10,
            "hidden_dim": 16,
            "time_norm": 288.0,
            "estimator": net.state_dict(),
        },
        path,
    )


def argv_of(script: str, name: str, base: str, *extra: str) -> list[str]:
    argv = [os.path.join(ROOT, "algos", f"{script}.py"), *TINY, "--run-name", name, *extra]
    if script.startswith("groupdr"):
        argv += ["--estimator-checkpoint", os.path.join(base, "estimator.pt"), "--train-configs", ",".join(GROUPDR_CONFIGS)]
    return argv


def start_background_jobs():
    with _BG_LOCK:
        if _BG:
            return _BG
        base = tempfile.mkdtemp(prefix="test_resume_")
        write_estimator(os.path.join(base, "estimator.pt"))
        runner = os.path.join(base, "runner.py")
        with open(runner, "w") as f:
            f.write(RUNNER)
        ref, broken = os.path.join(base, "ref"), os.path.join(base, "broken")
        os.makedirs(ref)
        os.makedirs(broken)

        def job(name, cwd, argv, mode="run", **extra):
            return {
                "name": name,
                "cwd": cwd,
                "argv": argv,
                "mode": mode,
                "out": os.path.join(base, name + ".out"),
                "err": os.path.join(base, name + ".err"),
                **extra,
            }

        nan = [
            job(
                f"nan_{s}",
                ref,
                [
                    os.path.join(ROOT, "algos", f"{s}.py"),
                    "--total-episodes",
                    "3",
                    "--episode-steps",
                    str(EPISODE_STEPS),
                    "--learning-starts",
                    str(EPISODE_STEPS),
                    "--batch-size",
                    "8",
                    "--buffer-size",
                    "32",
                    "--checkpoint-every",
                    "1",
                    "--learning-rate",
                    "1e30",
                    "--torch-threads",
                    "1",
                    "--save-model",
                    "--run-name",
                    f"nan_{s}",
                ],
            )
            for s in NAN_SCRIPTS
        ]
        term = job(
            "term",
            ref,
            [
                os.path.join(ROOT, "algos", "robust_vdn_rho.py"),
                *TINY,
                "--total-episodes",
                str(TERM_EPISODES),
                "--checkpoint-every",
                "0",
                "--run-name",
                "term",
            ],
            "term",
        )
        # four runners (each one has run_py's hard cap); each script's uninterrupted, killed and resumed runs
        # in the same one (the same parent process: the same fused.py kernels even if the tree changes meanwhile)
        plans = [
            [
                j
                for s in group
                for j in (
                    job(f"ref_{s}", ref, argv_of(s, s, base)),
                    job(f"kill_{s}", broken, argv_of(s, s, base), "kill", kill_after=KILL_AFTER),
                    job(f"resume_{s}", broken, [os.path.join(ROOT, "algos", f"{s}.py"), "--resume", f"runs/{s}"]),
                )
            ]
            for group in (SCRIPTS[:3], SCRIPTS[3:6], SCRIPTS[6:8], SCRIPTS[8:])
        ]
        plans[2].append(term)
        plans[3] += nan
        paths = []
        for i, jobs in enumerate(plans):
            paths.append(os.path.join(base, f"plan{i + 1}.json"))
            with open(paths[-1], "w") as f:
                warm = ["env_1", *GROUPDR_CONFIGS] if any("groupdr" in j["name"] for j in jobs) else ["env_1"]
                json.dump({"warm": sorted(set(warm)), "jobs": jobs}, f)
        _BG.update(base=base, ref=ref, broken=broken, jobs={j["name"]: j for plan in plans for j in plan})

        def run():
            try:
                _BG["procs"] = run_parallel([(runner, [p], base) for p in paths], workers=2)
            except Exception as err:  # noqa: BLE001 - reported by the tests
                _BG["error"] = err

        _BG["thread"] = threading.Thread(target=run, daemon=True)
        _BG["thread"].start()
        return _BG


def stop_background_jobs():
    with _BG_LOCK:
        if not _BG:
            return
        _BG["thread"].join(timeout=SUBPROCESS_TIMEOUT)
        shutil.rmtree(_BG["base"], ignore_errors=True)
        _BG.clear()


@pytest.fixture(scope="module")
def bg():
    jobs = start_background_jobs()  # no-op when conftest's hook already started them
    jobs["thread"].join()  # each runner has run_py's hard cap
    assert "error" not in jobs, jobs.get("error")
    procs = jobs["procs"]
    codes = {}
    for proc in procs:
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
        assert proc.returncode == 0 and line, describe(proc)
        codes.update(json.loads(line[0][len("RESULTS ") :]))
    jobs["codes"] = codes
    yield jobs
    stop_background_jobs()


def output(bg, name):
    """(exit status, stdout, stderr) of one job, and a description for failing assertions."""
    job = bg["jobs"][name]
    out, err = (pathlib.Path(job[k]).read_text() for k in ("out", "err"))
    return bg["codes"][name], out, err, f"job {name}: rc {bg['codes'][name]}\n--- stdout\n{out}\n--- stderr\n{err}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # checkpoint.pt and model.pt: tensors, plain types


def differences(a, b, where=""):
    """Every place two nested checkpoints differ (tensors and arrays bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(a.keys() ^ b.keys(), key=str)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ------------------------------------------ resume -----------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_killed_and_resumed_run_equals_uninterrupted_run(bg, script):
    rc_ref, _out_ref, _, why_ref = output(bg, f"ref_{script}")
    assert rc_ref == 0, why_ref
    rc_kill, out_kill, _, why_kill = output(bg, f"kill_{script}")
    assert rc_kill == -9, why_kill  # died by SIGKILL, in episode 4 after the checkpoint of episode 2
    assert f"episode 3/{EPISODES} " in out_kill and f"episode 4/{EPISODES} " not in out_kill, why_kill
    rc_res, out_res, _, why_res = output(bg, f"resume_{script}")
    assert rc_res == 0, why_res
    # it continued from the checkpoint: episodes 3 and 4 only, not a fresh run
    assert f"resumed runs/{script}/checkpoint.pt: episode {EVERY}, env step {EVERY * EPISODE_STEPS}" in out_res, why_res
    assert [ln.split(" | ")[0] for ln in out_res.splitlines() if ln.startswith("episode ")] == [
        f"episode {e}/{EPISODES}" for e in range(EVERY + 1, EPISODES + 1)
    ], why_res

    ref_dir, res_dir = (os.path.join(bg[k], "runs", script) for k in ("ref", "broken"))
    a, b = load(os.path.join(ref_dir, "checkpoint.pt")), load(os.path.join(res_dir, "checkpoint.pt"))
    assert a["counters"] == {"episode": EPISODES, "global_step": EPISODES * EPISODE_STEPS}
    assert a["state"]["rb"]["version"] >= 2  # target copies happened, before and after the checkpoint
    assert differences(a["state"], b["state"], "state") == []  # networks, targets, optimisers, buffer, generator
    assert differences(a["rng"], b["rng"], "rng") == []
    assert differences(a["counters"], b["counters"], "counters") == []
    assert {k: v for k, v in a["args"].items() if k != "resume"} == {k: v for k, v in b["args"].items() if k != "resume"}
    ma, mb = load(os.path.join(ref_dir, "model.pt")), load(os.path.join(res_dir, "model.pt"))
    parts = [p for p in ("q_network", "mixer", "joint", "dual") if p in ma]
    assert parts and differences({p: ma[p] for p in parts}, {p: mb[p] for p in parts}) == []
    # TensorBoard: the uninterrupted run's points, none twice (the killed process logged episode 3 too)
    assert scalars(res_dir, "charts/episodic_return") == scalars(ref_dir, "charts/episodic_return")
    assert [s for s, _ in scalars(ref_dir, "charts/episodic_return")] == [EPISODE_STEPS * (e + 1) for e in range(EPISODES)]


def test_sigterm_finishes_the_episode_writes_a_checkpoint_and_says_how_to_resume(bg):
    rc, out, err, why = output(bg, "term")
    assert rc == 143, why
    lines = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert len(lines) == 1 and "Traceback" not in err, why
    ckpt = load(os.path.join(bg["ref"], "runs", "term", "checkpoint.pt"))
    episode = ckpt["counters"]["episode"]
    assert 1 <= episode < TERM_EPISODES and ckpt["counters"]["global_step"] == episode * EPISODE_STEPS, why
    assert f"after episode {episode} (env step {episode * EPISODE_STEPS})" in lines[0], why
    assert lines[0].endswith(f"continue with: python {os.path.join(ROOT, 'algos', 'robust_vdn_rho.py')} --resume runs/term"), (
        why
    )
    assert not os.path.exists(os.path.join(bg["ref"], "runs", "term", "model.pt"))


@pytest.mark.parametrize("script", NAN_SCRIPTS)
def test_nan_guard_stops_a_diverging_run(bg, script):
    rc, _out, err, why = output(bg, f"nan_{script}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 3 and len(lines) == 1 and lines[0].startswith("error: non-finite gradient norm"), why
    episode, step = (
        int(x) for x in re.search(r" in episode (\d+) \(after env step (\d+) at the last episode end\)", lines[0]).groups()
    )
    assert episode >= 2 and step == (episode - 1) * EPISODE_STEPS, why  # no update before --learning-starts (episode 1)
    run_dir = os.path.join(bg["ref"], "runs", f"nan_{script}")
    assert not os.path.exists(os.path.join(run_dir, "model.pt")), why
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert ckpt["counters"] == {"episode": episode - 1, "global_step": step}, why  # the last one before the divergence
    assert lines[0].endswith(
        f"last good checkpoint runs/nan_{script}/checkpoint.pt (episode {episode - 1}, env step {step})"
    ), why
    tensors = [
        t for part in ckpt["state"].values() if isinstance(part, dict) for t in part.values() if isinstance(t, torch.Tensor)
    ]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_save_model_refuses_non_finite_weights(tmp_path, capsys):
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    args = type("Args", (), {})()
    with pytest.raises(SystemExit) as exit_info:
        runs.save_model(str(tmp_path), "algos/robust_vdn_rho.py", args, {}, q_network=net)
    assert exit_info.value.code == 3 and "q_network" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


# --------------------------------------- resume arguments ----------------------------------------


@pytest.fixture()
def vdn_run(bg, tmp_path):
    """A copy of the resumed robust_vdn_rho run folder (its checkpoint: --target-network-frequency 15,
    --checkpoint-every 2)."""
    rc, _, _, why = output(bg, "resume_robust_vdn_rho")
    assert rc == 0, why
    dst = tmp_path / "runs" / "q"
    shutil.copytree(os.path.join(bg["broken"], "runs", "robust_vdn_rho"), dst)
    return str(dst)


def resume(run_dir, argv, capsys, script="robust_vdn_rho"):
    """runs.parse_args as robust_vdn_rho.py calls it (its Args and check_args), with the command line
    --resume run_dir *argv, as if the script were algos/<script>.py. -> (args, the checkpoint read)."""
    mod = import_file("robust_vdn_rho_under_test", "algos/robust_vdn_rho.py")
    capsys.readouterr()
    path = os.path.join(ROOT, "algos", f"{script}.py")
    args = runs.parse_args(mod.Args, path, mod.check_args, ["--resume", run_dir, *argv])
    return args, runs.read_run_checkpoint(args.resume, path)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--seed", "2"], "--seed"),
        (["--rho", "0.5"], "--rho"),
        (["--no-fused"], "--fused"),
        (["--target-network-frequency=16"], "--target-network-frequency"),
    ],
)
def test_resume_refuses_a_differing_flag(vdn_run, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        resume(vdn_run, argv, capsys)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_info.value.code != 0 and len(lines) == 1 and lines[0].startswith(f"error: {flag} "), lines


def test_resume_takes_budget_flags_and_the_checkpoints_other_flags(vdn_run, capsys):
    args, ckpt = resume(vdn_run, ["--total-episodes", "9", "--log-every", "3", "--seed", "1"], capsys)
    assert (args.total_episodes, args.log_every) == (9, 3)  # budget flags: the command line's
    assert args.target_network_frequency == 15 and args.checkpoint_every == EVERY  # left out: the checkpoint's
    assert args.buffer_size == 32 and args.run_name == "robust_vdn_rho" and args.save_model
    assert ckpt["counters"]["episode"] == EPISODES
    # another script's checkpoint, or none at all: one line naming --resume
    for script, run_dir in (("robust_qmix_rho", vdn_run), ("robust_vdn_rho", os.path.dirname(vdn_run))):
        with pytest.raises(SystemExit):
            resume(run_dir, [], capsys, script=script)
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: --resume"), lines


# ------------------------------------------ bad flags --------------------------------------------

BAD_FLAGS = [  # (field, bad value): every count / frequency flag, and the real-valued ones
    ("log_every", 0),
    ("target_network_frequency", 0),
    ("train_frequency", 0),
    ("checkpoint_every", -1),
    ("eval_every", -1),
    ("eval_episodes", 0),
    ("batch_size", 0),
    ("buffer_size", 0),
    ("buffer_size", 8),
    ("window", 0),
    ("total_episodes", 0),
    ("total_steps", -1),
    ("episode_steps", -1),
    ("learning_starts", -1),
    ("exploration_steps", 0),
    ("hidden_dim", 0),
    ("mixing_embed_dim", 0),
    ("dual_hidden_dim", 0),
    ("torch_threads", -1),
    ("gamma", 1.0),
    ("learning_rate", 0.0),
    ("qtran_learning_rate", -1e-3),
    ("dual_learning_rate", 0.0),
    ("max_grad_norm", -1.0),
    ("dual_max_grad_norm", -1.0),
    ("rmsprop_eps", -1.0),
    ("start_e", 1.5),
    ("end_e", -0.1),
    ("eval_sigma", -1.0),
]


def script_args(script, **fields):
    mod = import_file(f"{script}_under_test", f"algos/{script}.py")
    if script.startswith("groupdr"):
        fields.setdefault("estimator_checkpoint", __file__)  # check_args only needs an existing file first
    return mod, mod.Args(**fields)


def test_default_flags_pass_every_check():
    for script in SCRIPTS:
        mod, args = script_args(script)
        mod.check_args(args)  # no SystemExit


@pytest.mark.parametrize("field, value", BAD_FLAGS)
def test_bad_flag_gives_one_error_line(field, value, capsys):
    flag = "--" + field.replace("_", "-")
    checked = 0
    for script in SCRIPTS:
        mod, args = script_args(script)
        if not hasattr(args, field):
            continue
        setattr(args, field, value)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            mod.check_args(args)
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert exit_info.value.code != 0, script
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag} must be") and f"(got {value}" in lines[0], (
            script,
            lines,
        )
        checked += 1
    assert checked, f"no script has {flag}"


@pytest.mark.parametrize(
    "argv",
    [["--log-every", "0"], ["--target-network-frequency", "0"], ["--train-frequency", "0"], ["--resume", "runs/nothing"]],
)
def test_bad_flag_creates_no_run_folder(argv, tmp_path, monkeypatch, capsys):
    """The script itself, in-process: one error line, exit != 0, no traceback, nothing under runs/."""
    monkeypatch.chdir(tmp_path)
    script = os.path.join(ROOT, "algos", "robust_vdn_rho.py")
    monkeypatch.setattr(sys, "argv", [script, *argv, "--run-name", "never"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_info.value.code != 0 and len(lines) == 1 and lines[0].startswith("error: " + argv[0]), lines
    assert not os.path.exists(tmp_path / "runs")


# --------------------------------------- progress line -------------------------------------------


def _run_with_clock(monkeypatch, tmp_path, resume_at=None, **flags):
    """A runs.Run in tmp_path on a fake clock (runs.time.time), its loop entered (clocks started) at t = 1000 s.
    resume_at=(episode, env step): first a checkpoint at that point, written by a Run, then the Run resumes it."""
    fields = {
        "log_every": 2,
        "total_episodes": 9,
        "total_steps": 0,
        "checkpoint_every": 0,
        "checkpoint_minutes": 0.0,
        "train_frequency": 2,
        "learning_starts": 0,
        "resume": "",
        **flags,
    }
    clock = {"now": 1000.0}
    monkeypatch.setattr(runs.time, "time", lambda: clock["now"])
    if resume_at is not None:
        first = runs.Run(str(tmp_path), types.SimpleNamespace(**fields), "algos/robust_vdn_rho.py")
        first.__enter__()  # with run: (nothing tracked)
        first.episode, first.global_step = resume_at
        first.save()
        first.close()
        fields["resume"] = str(tmp_path)
    run = runs.Run(str(tmp_path), types.SimpleNamespace(**fields), "algos/robust_vdn_rho.py")
    run.__enter__()  # on --resume: the checkpoint loaded back
    return run, clock


def test_progress_line_every_log_every_episodes_with_rates_and_time_left(monkeypatch, tmp_path, capsys):
    run, clock = _run_with_clock(monkeypatch, tmp_path)
    try:
        capsys.readouterr()
        assert run.episode_end(1, 100, -3.0, 0.5) is False  # not a --log-every episode
        assert capsys.readouterr().out == ""
        clock["now"] += 20.0  # 2 episodes of 10 s: 200 env steps, 100 updates (one every 2 steps)
        assert run.episode_end(2, 200, -5.0, 0.25) is False
        assert run.sps(200) == 10
        line = capsys.readouterr().out.strip()
        assert line == "episode 2/9 | return -4.0 | epsilon 0.250 | SPS 10 | updates/s 5.0 | left 1.2 min", line  # 7 x 10 s
        clock["now"] += 5.0
        assert run.episode_end(9, 260, -1.0, 0.2) is True  # the last episode always prints (9 is no --log-every one)
        line = capsys.readouterr().out.strip()
        assert line == "episode 9/9 | return -1.0 | epsilon 0.200 | SPS 12 | updates/s 6.0 | left 0.0 min", line
    finally:
        run.close()


def test_progress_ends_the_run_at_total_steps(monkeypatch, tmp_path, capsys):
    run, clock = _run_with_clock(monkeypatch, tmp_path, total_steps=250)
    try:
        clock["now"] += 10.0
        assert run.episode_end(1, 249, -3.0, 0.5) is False and capsys.readouterr().out == ""
        assert run.episode_end(2, 250, -5.0, 0.5) is True  # --total-steps reached: the loop ends, a line printed
        assert capsys.readouterr().out.startswith("episode 2/9 | step 250/250 | return -4.0 ")  # both budgets shown
    finally:
        run.close()


def test_progress_after_resume_counts_this_process_only(monkeypatch, tmp_path, capsys):
    run, clock = _run_with_clock(monkeypatch, tmp_path, resume_at=(6, 600), total_episodes=10)
    try:
        assert (run.episode, run.global_step) == (6, 600)
        assert f"resumed {tmp_path}/checkpoint.pt: episode 6, env step 600" in capsys.readouterr().out
        clock["now"] += 30.0  # 2 episodes in 30 s after the resume: 2 left -> 30 s
        run.episode_end(8, 800, -2.0, 0.1)
        assert run.sps(800) == 6  # 200 steps / 30 s, not 800 / 30
        line = capsys.readouterr().out.strip()
        assert line == "episode 8/10 | return -2.0 | epsilon 0.100 | SPS 7 | updates/s 3.3 | left 0.5 min", line
    finally:
        run.close()


@pytest.mark.parametrize(
    "share,clamp,worst,printed",
    [(1.0, True, "zero", True), (0.99, True, "zero", False), (1.0, False, "zero", False), (1.0, True, "batch-min", False)],
)
def test_eta_floor_note_only_when_the_clamped_paper_operator_is_nominal(tmp_path, capsys, share, clamp, worst, printed):
    args = types.SimpleNamespace(eta_clamp=clamp, worst_value=worst, resume="")
    run = runs.Run(str(tmp_path), args, "algos/robust_vdn_tv.py")
    try:
        capsys.readouterr()
        run.note_eta_floor(share, 1234)
        out = capsys.readouterr().out
        assert (
            (
                out.startswith(f"note: eta sat at its floor for {100 * share:.0f}% ")
                and "env step 1234" in out
                and "docs/robust_operators.md" in out
            )
            if printed
            else out == ""
        )
        run.note_eta_floor(share, 1300)
        assert capsys.readouterr().out == ""  # once per process
    finally:
        run.close()
