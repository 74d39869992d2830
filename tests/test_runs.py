"""runs.py, the run plumbing of the algos/ scripts, on robust_vdn_rho.py run in this process (tiny budgets).

* (a) model.pt and checkpoint.pt load with a plain torch.load(weights_only=True): tensors and plain types only;
* (b) a run checkpoint of the previous layout (v1: numpy arrays, the DRQN's old parameter names, the six old
  counters; built here by hand from a new one) resumes under today's code to exactly the final weights,
  optimiser state, replay buffer and RNG states of an uninterrupted run;
* (c) a model.pt of the previous layout (v2: the DRQN's old names) evaluates exactly as its v3 twin;
* (d) a file naming an algorithm that is not one of the nine scripts, or holding any other global than
  tensors and plain types (a class instance, a call), is refused in one line, exit 2, and no code of it runs,
  by --resume and by eval.py;
* (e) a value outside a Literal flag's choices: one stderr line naming the flag and every choice, exit 2;
* (f) the NaN guard: a NaN reward stops the run in one line, exit 3, before the optimiser steps on it.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import ROOT, describe, import_file, run_parallel, run_script_in_process

import envs
import fused
import runs

SCRIPT = os.path.join(ROOT, "algos", "robust_vdn_rho.py")
EPISODE_STEPS, EPISODES, CUT = 12, 4, 2
# target copies every 15 steps (the cached V' change version), a buffer that wraps, a checkpoint every 2 episodes
TINY = [
    "--total-episodes",
    EPISODES,
    "--episode-steps",
    EPISODE_STEPS,
    "--learning-starts",
    8,
    "--batch-size",
    8,
    "--buffer-size",
    32,
    "--target-network-frequency",
    15,
    "--torch-threads",
    1,
    "--log-every",
    1,
    "--checkpoint-every",
    CUT,
    "--rho",
    0.1,
    "--save-model",
    "--run-name",
    "r",
]
# the DRQN's parameter names before 2026-12-02 (v1 run checkpoints, v2 model.pt) -> today's
OLD_NAMES = {
    "fc1_obs": "fc1.weight_obs",
    "fc1_table": "fc1.weight_onehot",
    "fc1_bias": "fc1.bias",
    "lstm_weight_ih": "lstm.weight_ih_l0",
    "lstm_weight_hh": "lstm.weight_hh_l0",
    "lstm_bias_ih": "lstm.bias_ih_l0",
    "lstm_bias_hh": "lstm.bias_hh_l0",
    "fc_out_weight": "fc_out.weight",
    "fc_out_bias": "fc_out.bias",
}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # plain: no safe_globals


def differences(a, b, where=""):
    """Every place two nested checkpoints differ (tensors bit for bit, with their dtypes)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(a.keys() ^ b.keys(), key=str)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


def leaves(obj):
    """Every leaf of a nested dict / list / tuple."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in leaves(v)]
    return [obj]


def train(cwd, *extra):
    """robust_vdn_rho.py as __main__ in cwd with TINY (+ extra) -> its globals."""
    os.makedirs(cwd, exist_ok=True)
    return run_script_in_process(SCRIPT, [*TINY, *extra], str(cwd))


def run_main(argv, cwd, capsys):
    """robust_vdn_rho.py as __main__ that must stop: -> (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script_in_process(SCRIPT, argv, str(cwd))
    return exit_info.value.code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (EPISODES episodes) and the same run cut after CUT episodes (its checkpoint.pt:
    --total-episodes is a budget flag, no number depends on it). -> their run folders."""
    base = tmp_path_factory.mktemp("runs")
    envs.make_env("building", "env_1")  # sustaingym's parameters, cached per process: built here, not inside one
    train(base / "full")  # run only (building them draws from python's random after its seed)
    train(base / "cut", "--total-episodes", CUT)
    return {"full": str(base / "full" / "runs" / "r"), "cut": str(base / "cut" / "runs" / "r")}


# ------------------------------------------- (a) -------------------------------------------------
def test_model_and_checkpoint_load_with_weights_only(reference):
    for name in ("model.pt", "checkpoint.pt"):
        ckpt = load(os.path.join(reference["full"], name))
        assert all(isinstance(x, (torch.Tensor, int, float, str, bool, type(None))) for x in leaves(ckpt)), name
    model, run = load(os.path.join(reference["full"], "model.pt")), load(os.path.join(reference["full"], "checkpoint.pt"))
    assert model["format"] == "drigm-checkpoint-v3" and run["format"] == "drigm-run-checkpoint-v2"
    assert run["algo"] == model["algo"] == "robust_vdn_rho"
    assert run["counters"] == {"episode": EPISODES, "global_step": EPISODES * EPISODE_STEPS}
    assert set(run["state"]) == {"q_network", "target_network", "optimizer", "rb", "rng"}
    assert run["state"]["rb"]["version"] == EPISODES * EPISODE_STEPS // 15  # the hard copies so far
    assert isinstance(run["state"]["rb"]["obs"], torch.Tensor)  # the buffer's arrays as tensors
    assert set(model["q_network"]) == {f"drqn.{k}" for k in OLD_NAMES.values()}


# ------------------------------------------- (b) -------------------------------------------------
def to_v1(ckpt: dict, args) -> dict:
    """A run checkpoint in the layout algos/*.py wrote before 2026-12-02 (eval.TrainingRun, format v1): the
    replay buffer as its numpy arrays and ints (dict(vars(rb)), no version: the V' cache version was the
    target_version counter), the DRQN's old names, np.random.get_state() with its numpy array, and
    robust_vdn_rho's six counters (episode, global_step, n_updates, target_version, next_eval, recent)."""
    state = dict(ckpt["state"])
    for name in ("q_network", "target_network"):
        state[name] = {f"drqn.{old}": state[name][f"drqn.{new}"] for old, new in OLD_NAMES.items()}
        assert len(state[name]) == len(ckpt["state"][name])
    rb = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in ckpt["state"]["rb"].items()}
    version = rb.pop("version")
    assert all(isinstance(v, (np.ndarray, int)) for v in rb.values())
    kind, keys, pos, has_gauss, cached = ckpt["rng"]["numpy"]
    rng = dict(ckpt["rng"], numpy=(kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    episode, step = ckpt["counters"]["episode"], ckpt["counters"]["global_step"]
    counters = {
        "episode": episode,
        "global_step": step,
        "n_updates": step // args["train_frequency"] - args["learning_starts"] // args["train_frequency"],
        "target_version": version,
        "next_eval": args["eval_every"],
        "recent": [],
    }
    return {
        "format": "drigm-run-checkpoint-v1",
        "algo": ckpt["algo"],
        "args": ckpt["args"],
        "counters": counters,
        "state": {**state, "rb": rb},
        "rng": rng,
    }


def test_v1_run_checkpoint_resumes_to_the_uninterrupted_run(reference, tmp_path, capsys):
    cut = load(os.path.join(reference["cut"], "checkpoint.pt"))
    assert cut["counters"] == {"episode": CUT, "global_step": CUT * EPISODE_STEPS}
    v1 = to_v1(cut, cut["args"])
    assert v1["counters"]["target_version"] == CUT * EPISODE_STEPS // 15 >= 1  # a hard copy before the cut
    assert v1["counters"]["n_updates"] == (CUT * EPISODE_STEPS - 8) // 2
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    torch.save(v1, run_dir / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):  # really the old layout: numpy arrays, not loadable plain
        load(run_dir / "checkpoint.pt")
    capsys.readouterr()
    run_script_in_process(SCRIPT, ["--resume", "runs/r", "--total-episodes", EPISODES], str(tmp_path))
    out = capsys.readouterr().out
    assert f"resumed runs/r/checkpoint.pt: episode {CUT}, env step {CUT * EPISODE_STEPS}" in out, out
    assert str(run_dir / "checkpoint.pt") not in runs._READ  # the checkpoint read (its buffer copy) is let go
    assert [ln.split(" | ")[0] for ln in out.splitlines() if ln.startswith("episode ")] == [
        f"episode {e}/{EPISODES}" for e in range(CUT + 1, EPISODES + 1)
    ], out
    a, b = load(os.path.join(reference["full"], "checkpoint.pt")), load(run_dir / "checkpoint.pt")
    assert b["format"] == "drigm-run-checkpoint-v2"  # the resumed run writes today's layout
    assert differences(a["state"], b["state"], "state") == []  # networks, target, optimiser, buffer, generator
    assert differences(a["rng"], b["rng"], "rng") == []
    assert a["counters"] == b["counters"]
    assert {k: v for k, v in a["args"].items() if k != "resume"} == {k: v for k, v in b["args"].items() if k != "resume"}
    ma, mb = load(os.path.join(reference["full"], "model.pt")), load(run_dir / "model.pt")
    assert differences(ma["q_network"], mb["q_network"], "model") == []
    # the cut run differs from the full one: the comparison above sees the resumed episodes
    assert differences(cut["state"]["q_network"], a["state"]["q_network"])


# ------------------------------------------- (c) -------------------------------------------------
def test_v2_model_evaluates_as_its_v3_conversion(reference, eval_mod, tmp_path):
    v3 = load(os.path.join(reference["full"], "model.pt"))
    v2 = dict(
        v3,
        format="drigm-checkpoint-v2",
        q_network={f"drqn.{old}": v3["q_network"][f"drqn.{new}"] for old, new in OLD_NAMES.items()},
    )
    assert len(v2["q_network"]) == len(v3["q_network"])
    paths = {name: str(tmp_path / f"{name}.pt") for name in ("v2", "v3")}
    torch.save(v2, paths["v2"])
    torch.save(v3, paths["v3"])
    nets = {name: eval_mod.load_checkpoint(path, torch.device("cpu"))[2] for name, path in paths.items()}
    assert differences(nets["v2"].state_dict(), nets["v3"].state_dict()) == []
    assert differences(nets["v3"].state_dict(), dict(v3["q_network"])) == []
    out = {
        name: eval_mod.main(
            eval_mod.Args(
                checkpoints=[path],
                protocol="custom",
                configs="env_1",
                days="0:3",
                episode_steps=20,
                out=str(tmp_path / f"{name}.json"),
            )
        )
        for name, path in paths.items()
    }
    torch.set_num_threads(1)
    returns = {name: o["episodes"][0]["returns"] for name, o in out.items()}
    assert len(returns["v3"]) == 3 and returns["v2"] == returns["v3"]
    assert len(set(returns["v3"])) > 1  # three different days: real rollouts


# ------------------------------------------- (d) -------------------------------------------------
class Payload:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class Holder:  # a plain class instance: a global that is not a tensor or a plain type
    def __init__(self, **fields):
        self.__dict__.update(fields)


def one_error_line(code, lines, flag):
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag}"), (code, lines)
    return lines[0]


@pytest.mark.parametrize("algo", ["../evil", "ABSOLUTE"])
def test_checkpoint_of_another_algo_is_refused(reference, eval_mod, tmp_path, capsys, algo):
    """algo '../evil' (algos/../evil.py) or an absolute path to a script that exists and would write a marker
    when imported: --resume and eval.py refuse it in one line naming the nine scripts; nothing is imported."""
    marker = tmp_path / "imported"
    if algo == "ABSOLUTE":
        (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        algo = str(tmp_path / "evil")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    torch.save(dict(load(os.path.join(reference["full"], "checkpoint.pt")), algo=algo), run_dir / "checkpoint.pt")
    line = one_error_line(*run_main(["--resume", "runs/r"], tmp_path, capsys), "--resume")
    assert f"belongs to algos/{algo}.py, not algos/robust_vdn_rho.py" in line, line
    model = tmp_path / "model.pt"
    torch.save(dict(load(os.path.join(reference["full"], "model.pt")), algo=algo), model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_mod.main(
            eval_mod.Args(
                checkpoints=[str(model)], protocol="custom", configs="env_1", days="0:1", out=str(tmp_path / "e.json")
            )
        )
    torch.set_num_threads(1)
    line = one_error_line(exit_info.value.code, capsys.readouterr().err.strip().splitlines(), "--checkpoints")
    assert f"names algorithm '{algo}'; accepted: {', '.join(runs.ALGOS)}" in line, line
    assert len(runs.ALGOS) == 9 and not marker.exists() and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("kind", ["instance", "call"])
def test_pickle_with_another_global_is_refused_without_running_it(reference, eval_mod, tmp_path, capsys, kind):
    """A checkpoint.pt / model.pt otherwise valid, with one object that is not a tensor or a plain type: a class
    instance (args as an object), or a call that writes a marker file when unpickled. --resume and eval.py
    refuse the file in one line; the marker is never written (it is, by a torch.load(weights_only=False))."""
    marker = tmp_path / "ran"
    evil = Holder(seed=1) if kind == "instance" else Payload(str(marker))
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    ckpt = load(os.path.join(reference["full"], "checkpoint.pt"))
    torch.save(dict(ckpt, args=dict(ckpt["args"], evil=evil)), run_dir / "checkpoint.pt")
    line = one_error_line(*run_main(["--resume", "runs/r"], tmp_path, capsys), "--resume")
    assert "cannot read" in line and "tensors and plain types" in line, line
    model = tmp_path / "model.pt"
    torch.save(dict(load(os.path.join(reference["full"], "model.pt")), env=evil), model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_mod.main(
            eval_mod.Args(
                checkpoints=[str(model)], protocol="custom", configs="env_1", days="0:1", out=str(tmp_path / "e.json")
            )
        )
    torch.set_num_threads(1)
    line = one_error_line(exit_info.value.code, capsys.readouterr().err.strip().splitlines(), "--checkpoints")
    assert "cannot read" in line and "tensors and plain types" in line, line
    assert not marker.exists() and not (tmp_path / "e.json").exists()
    if kind == "call":  # the payload is live: an unrestricted load runs it
        torch.load(model, weights_only=False)
        assert marker.exists()


# ------------------------------------------- (e) -------------------------------------------------
LITERAL_CASES = [
    (["--worst-value", "bogus"], "--worst-value", ("zero", "batch-min")),
    (["--env", "bogus"], "--env", ("building", "matrix", "smax", "smac")),
]


def test_bad_literal_value_one_line_as_a_script(tmp_path):
    """The script as a subprocess: exactly one stderr line naming the flag and its choices, exit 2, nothing else."""
    procs = run_parallel(
        [("algos/robust_vdn_rho.py", [*argv, "--run-name", "never"], str(tmp_path)) for argv, _, _ in LITERAL_CASES], workers=2
    )
    for proc, (argv, flag, choices) in zip(procs, LITERAL_CASES):
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1, describe(proc)
        assert lines[0] == f"error: {flag} must be one of {', '.join(choices)} (got 'bogus')", describe(proc)
        assert "Traceback" not in proc.stdout + proc.stderr and proc.stdout == "", describe(proc)
    assert not (tmp_path / "runs").exists()


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_literal_flag_of_every_script_refuses_a_bad_value(script, capsys):
    """runs.parse_args on each Literal field of the script's Args (--flag x and --flag=x): one line naming the
    flag and every choice, exit 2; every choice itself is accepted. The six robust scripts have --env at least."""
    mod = import_file(f"{script}_runs_under_test", f"algos/{script}.py")
    choices = runs.choice_fields(mod.Args)
    assert "env" in choices or script.startswith("groupdr"), choices
    for field, values in choices.items():
        flag = "--" + field.replace("_", "-")
        for argv in ([flag, "bogus"], [f"{flag}=bogus"]):
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_info:
                runs.parse_args(mod.Args, os.path.join(ROOT, "algos", f"{script}.py"), None, argv)
            lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert exit_info.value.code == 2 and lines == [
                f"error: {flag} must be one of {', '.join(values)} (got 'bogus')"
            ], (script, argv, lines)
        for value in values:
            runs.check_choices(mod.Args, [flag, value])  # no SystemExit


# ------------------------------------------- (f) -------------------------------------------------
NAN_FROM = EPISODE_STEPS + 1  # the env returns reward NaN from this env step on (episode 2)


def test_nan_guard_stops_before_the_optimiser_steps_on_a_nan(tmp_path, monkeypatch, capsys):
    """A reward that becomes NaN in episode 2: the first minibatch holding it gives a NaN target, loss and
    gradient; clip_grad_norm_(error_if_nonfinite=True) raises before optimizer.step, and Run turns it into one
    line naming the episode and the last good checkpoint, exit 3, no model.pt. The weights and the optimiser
    state the run leaves are exactly those after its last (finite) step, the gradient it stopped on is
    non-finite, and the checkpoint on disk is finite."""
    seen, after_step, calls = {}, [], {"step": 0}
    track, step, env_step = runs.Run.track, fused.RMSprop.step, envs.BuildingTask.step

    def tracking(self, **state):
        seen.update(state)
        return track(self, **state)

    def stepping(self, *a, **k):
        out = step(self, *a, **k)
        calls["step"] += 1
        after_step[:] = [
            {k: v.detach().clone() for k, v in seen["q_network"].state_dict().items()},
            {k: v.clone() for k, v in _flat(self.state_dict()).items()},
        ]
        return out

    def nan_reward(self, actions):
        calls["env"] = calls.get("env", 0) + 1
        obs, state, avail, reward, terminated, truncated, info = env_step(self, actions)
        return obs, state, avail, float("nan") if calls["env"] >= NAN_FROM else reward, terminated, truncated, info

    monkeypatch.setattr(runs.Run, "track", tracking)
    monkeypatch.setattr(fused.RMSprop, "step", stepping)
    monkeypatch.setattr(envs.BuildingTask, "step", nan_reward)
    code, lines = run_main([*TINY, "--checkpoint-every", 1], tmp_path, capsys)
    assert code == 3 and len(lines) == 1, lines
    head = "error: non-finite gradient norm (loss, target or gradient) in episode "
    assert lines[0].startswith(head), lines
    episode = int(lines[0][len(head) :].split()[0])
    step_at = (episode - 1) * EPISODE_STEPS
    assert episode >= 2 and calls["env"] > step_at, lines  # stopped in the episode where the NaN came
    assert f"(after env step {step_at} at the last episode end)" in lines[0], lines
    assert lines[0].endswith(f"last good checkpoint runs/r/checkpoint.pt (episode {episode - 1}, env step {step_at})")
    # no step on the NaN: the weights and optimiser state are those of the last step, all finite
    assert calls["step"] > 0
    weights, opt = after_step
    now = seen["q_network"].state_dict()
    assert differences(now, weights) == [] and all(torch.isfinite(v).all() for v in now.values())
    assert differences(_flat(seen["optimizer"].state_dict()), opt) == []
    assert all(torch.isfinite(v).all() for v in opt.values() if v.is_floating_point())
    grads = [p.grad for p in seen["q_network"].parameters() if p.grad is not None]
    assert grads and not all(torch.isfinite(g).all() for g in grads)  # what the guard stopped
    ckpt = load(tmp_path / "runs" / "r" / "checkpoint.pt")
    assert ckpt["counters"] == {"episode": episode - 1, "global_step": step_at}
    assert all(torch.isfinite(t).all() for part in ("q_network", "target_network") for t in ckpt["state"][part].values())
    assert not (tmp_path / "runs" / "r" / "model.pt").exists()


def _flat(optimizer_state: dict) -> dict:
    """An optimiser's state_dict -> {"param i.key": tensor}."""
    return {f"{i}.{k}": v for i, s in optimizer_state["state"].items() for k, v in s.items()}


def test_run_checkpoint_of_another_format_is_refused(reference, tmp_path, capsys):
    """A dict that is no run checkpoint (e.g. a model.pt given to --resume): one line naming --resume, exit 2."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    torch.save(load(os.path.join(reference["full"], "model.pt")), run_dir / "checkpoint.pt")
    line = one_error_line(*run_main(["--resume", "runs/r"], tmp_path, capsys), "--resume")
    assert "is not a training checkpoint written by algos/*.py" in line, line
