"""End-to-end runs of the five variant scripts (QMIX/QTRAN rho, VDN/QMIX/QTRAN TV) with a tiny budget.

One session fixture starts every run (a few at a time) and the tests read the results:
* seed 1, per script: exit 0, progress line, model.pt with the expected keys that load into the
  script's own classes;
* determinism (QMIX-TV and QTRAN-TV: together every network type: agents, mixer, QTRAN nets, dual):
  seed 1 again -> identical weights (so identical losses at every update) and returns; seed 2 ->
  different weights and returns;
* each non-default flag (rho, batch-min, squared dual loss, no eta clamp, adam, shared params, --no-fused:
  the plain-torch LSTM and RMSprop) shown to take effect, one at a time, in-process runs;
* eval.py on all five checkpoints (one call), when eval.py exists;
* bad input: one "error:" line naming the flag, exit != 0, no traceback.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import ROOT, describe, import_file, run_parallel, run_py, run_script_in_process
from torch.optim.optimizer import register_optimizer_step_post_hook

import fused

SCRIPTS = ["robust_qmix_rho", "robust_qtran_rho", "robust_vdn_tv", "robust_qmix_tv", "robust_qtran_tv"]
EXTRA_KEYS = {
    "robust_qmix_rho": {"mixer"},
    "robust_qtran_rho": {"joint"},
    "robust_vdn_tv": {"dual"},
    "robust_qmix_tv": {"mixer", "dual"},
    "robust_qtran_tv": {"joint", "dual"},
}
TINY = [
    "--total-episodes",
    "2",
    "--episode-steps",
    "20",
    "--learning-starts",
    "8",
    "--batch-size",
    "8",
    "--buffer-size",
    "200",
    "--torch-threads",
    "1",
    "--log-every",
    "1",
]
DETERMINISM = ["robust_qmix_tv", "robust_qtran_tv"]
BAD_INPUT = {  # script -> [(args, flag the error line must name)]
    "robust_qmix_rho": [
        (["--rho", "1.0"], "--rho"),
        (["--worst-value", "max"], "--worst-value"),
        (["--optimizer", "sgd"], "--optimizer"),
    ],
    "robust_qtran_rho": [(["--rho", "-0.1"], "--rho"), (["--worst-value", "max"], "--worst-value")],
    "robust_vdn_tv": [(["--rho", "-0.1"], "--rho"), (["--dual-loss", "cubic"], "--dual-loss")],
    "robust_qmix_tv": [(["--rho", "1.5"], "--rho"), (["--optimizer", "sgd"], "--optimizer")],
    "robust_qtran_tv": [
        (["--rho", "1.01"], "--rho"),
        (["--worst-value", "max"], "--worst-value"),
        (["--dual-loss", "cubic"], "--dual-loss"),
    ],
}
PROGRESS = re.compile(
    r"episode (\d+)/(\d+) \| return (-?[\d.]+) \| epsilon [\d.]+ \| SPS \d+ \| updates/s [\d.]+ "
    r"\| left [\d.]+ min$",
    re.MULTILINE,
)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Every training run, in parallel: {(script, tag): (proc, run dir)}."""
    cwd = str(tmp_path_factory.mktemp("smoke"))
    plan = {}
    for s in SCRIPTS:
        plan[(s, "a")] = ["--seed", "1", "--save-model"]
        if s in DETERMINISM:
            plan[(s, "b")] = ["--seed", "1", "--save-model"]
            plan[(s, "c")] = ["--seed", "2", "--save-model"]
    jobs = [(f"algos/{s}.py", [*TINY, *extra, "--run-name", f"{s}_{tag}"], cwd) for (s, tag), extra in plan.items()]
    procs = run_parallel(jobs, workers=2)
    return {key: (proc, os.path.join(cwd, "runs", f"{key[0]}_{key[1]}")) for key, proc in zip(plan, procs)}


def load(run):
    proc, run_dir = run
    assert proc.returncode == 0, describe(proc)
    path = os.path.join(run_dir, "model.pt")
    assert os.path.isfile(path), describe(proc)
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only


def tensors(ckpt):
    return {
        f"{part}.{k}": v for part in ("q_network", "mixer", "joint", "dual") if part in ckpt for k, v in ckpt[part].items()
    }


def returns(run):
    return [float(m.group(3)) for m in PROGRESS.finditer(run[0].stdout)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_and_checkpoint(runs, script):
    run = runs[(script, "a")]
    ckpt = load(run)
    lines = PROGRESS.findall(run[0].stdout)
    assert [(e, t) for e, t, _ in lines] == [("1", "2"), ("2", "2")], describe(run[0])
    assert set(ckpt) == {"format", "algo", "args", "env", "q_network"} | EXTRA_KEYS[script]
    assert ckpt["format"] == "drigm-checkpoint-v3" and ckpt["algo"] == script
    # the weights load into the script's own classes
    mod = import_file(f"{script}_under_test", f"algos/{script}.py")
    a, e = ckpt["args"], ckpt["env"]
    net = mod.QNetworks(e["n_agents"], e["obs_dim"], e["n_actions"], a["hidden_dim"], a["share_params"])
    net.load_state_dict(ckpt["q_network"])
    if "mixer" in ckpt:
        mod.QMixer(e["n_agents"], e["state_dim"], a["mixing_embed_dim"]).load_state_dict(ckpt["mixer"])
    if "joint" in ckpt:
        mod.QTranNetworks(e["n_agents"], e["n_actions"], e["state_dim"], a["hidden_dim"]).load_state_dict(ckpt["joint"])
    if "dual" in ckpt:
        mod.DualNetwork(e["state_dim"], e["n_agents"], e["n_actions"], a["dual_hidden_dim"]).load_state_dict(ckpt["dual"])


@pytest.mark.parametrize("script", DETERMINISM)
def test_same_seed_same_run_different_seed_different_run(runs, script):
    a, b, c = (tensors(load(runs[(script, tag)])) for tag in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert returns(runs[(script, "a")]) == returns(runs[(script, "b")])
    assert any(not torch.equal(a[k], c[k]) for k in a), "different seeds, same weights"
    assert returns(runs[(script, "a")]) != returns(runs[(script, "c")])


# One flag at a time, each against a run that differs only by that flag (same seed, same budget),
# both run in this process (conftest.run_script_in_process: ~0.2 s a run) so that the script's
# networks and optimiser can be inspected. (script, base flags, the flag under test)
FLAG_CASES = [
    ("robust_qmix_rho", [], ["--rho", "0.1"]),
    ("robust_qmix_rho", ["--rho", "0.1"], ["--worst-value", "batch-min"]),
    ("robust_qmix_rho", [], ["--optimizer", "adam"]),
    ("robust_qmix_rho", [], ["--no-fused"]),
    ("robust_qtran_rho", ["--rho", "0.1"], ["--worst-value", "batch-min"]),
    ("robust_qtran_rho", [], ["--share-params"]),
    ("robust_vdn_tv", [], ["--worst-value", "batch-min"]),
    ("robust_vdn_tv", [], ["--dual-loss", "squared"]),
    ("robust_vdn_tv", [], ["--no-eta-clamp"]),
    ("robust_vdn_tv", [], ["--no-fused"]),
    ("robust_qmix_tv", [], ["--dual-loss", "squared"]),
    ("robust_qmix_tv", [], ["--optimizer", "adam"]),
    ("robust_qmix_tv", [], ["--rho", "1.0"]),
    ("robust_qtran_tv", [], ["--worst-value", "batch-min"]),
    ("robust_qtran_tv", [], ["--no-eta-clamp"]),
    ("robust_qtran_tv", [], ["--share-params"]),
]
Q_SIDE, DUAL = ("q_network", "mixer", "qtran"), "dual_network"


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """(script, flags) -> what the run left: its weights, optimiser, Q-side parameters, the number of steps of
    its (first) optimiser and the use_kernel argument of every fused.lstm_last call (cached: base runs serve
    several cases)."""
    cwd, cache = str(tmp_path_factory.mktemp("flags")), {}

    def run(script, flags):
        key = (script, tuple(flags))
        if key not in cache:
            calls, original, steps = [], fused.lstm_last, []

            def recording(*args, **kwargs):
                calls.append(args[5] if len(args) > 5 else kwargs.get("use_kernel", True))
                return original(*args, **kwargs)

            fused.lstm_last = recording
            hook = register_optimizer_step_post_hook(lambda opt, *_: steps.append(id(opt)))  # every optimiser step
            try:
                g = run_script_in_process(
                    f"algos/{script}.py", [*TINY, "--seed", "1", *flags, "--run-name", f"{script}_{len(cache)}"], cwd
                )
            finally:
                fused.lstm_last = original
                hook.remove()
            optimizers = g["optimizers"] if "optimizers" in g else [g["optimizer"]]
            modules = {name: g[name] for name in (*Q_SIDE, DUAL) if name in g}
            cache[key] = {
                "weights": {f"{m}.{k}": v.detach().clone() for m, mod in modules.items() for k, v in mod.state_dict().items()},
                "optimizers": optimizers,
                "kernel_calls": calls,
                "n_updates": steps.count(id(optimizers[0])),
                "args": g["args"],
                "q_params": {id(p) for name in Q_SIDE if name in g for p in g[name].parameters()},
                "q_network": g["q_network"],
                "n_agents": g["N"],
                "n_actions": g["A"],
            }
        return cache[key]

    return run


def differs(a, b):
    return a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script,base_flags,flag", FLAG_CASES, ids=[f"{s}{' '.join(['', *b, *f])}" for s, b, f in FLAG_CASES])
def test_each_non_default_flag_takes_effect(in_process, script, base_flags, flag):
    """The run with the flag is not the run without it (same seed: every difference is the flag's), and
    where the flag selects a mechanism, that mechanism is what ran: Adam over every Q-side parameter
    (agents + mixer / QTRAN nets), no C++ LSTM kernel call and the plain-torch RMSprop with --no-fused
    (same equations: weights within float rounding of the fused run's), one shared DRQN with an agent-id
    input with --share-params, the dual network's own numbers with the dual flags."""
    base, run = in_process(script, base_flags), in_process(script, [*base_flags, *flag])
    assert base["n_updates"] == run["n_updates"] > 0
    name = flag[0]
    if name == "--no-fused":
        assert True in base["kernel_calls"] and run["kernel_calls"] and True not in run["kernel_calls"]
        assert base["optimizers"][0].use_kernel and not run["optimizers"][0].use_kernel  # fused.RMSprop's plain path
        assert base["weights"].keys() == run["weights"].keys()
        for k in base["weights"]:
            torch.testing.assert_close(run["weights"][k], base["weights"][k], rtol=1e-3, atol=1e-5, msg=k)
        return
    assert differs(base["weights"], run["weights"]), f"{flag} changed nothing"
    if name == "--optimizer":
        assert [type(o) for o in base["optimizers"]] == [fused.RMSprop] and [type(o) for o in run["optimizers"]] == [
            torch.optim.Adam
        ]
        covered = {id(p) for group in run["optimizers"][0].param_groups for p in group["params"]}
        assert covered == run["q_params"]  # agents and mixer / QTRAN nets, nothing missing
    if name == "--share-params":
        drqn, n, a = run["q_network"].drqn, run["n_agents"], run["n_actions"]
        assert drqn.fc1.bias.shape[0] == 1 and drqn.fc1.weight_onehot.shape[1] == a + n  # one net; one-hot id rows
        assert base["q_network"].drqn.fc1.bias.shape[0] == n
    if name in ("--dual-loss", "--no-eta-clamp"):
        dual = [k for k in base["weights"] if k.startswith(DUAL + ".")]
        assert dual and any(not torch.equal(base["weights"][k], run["weights"][k]) for k in dual)


def test_eval_reads_every_checkpoint(runs, tmp_path):
    if not os.path.isfile(os.path.join(ROOT, "eval.py")):
        pytest.skip("eval.py not written yet")
    checkpoints = []
    for script in SCRIPTS:
        load(runs[(script, "a")])
        checkpoints.append(os.path.join(runs[(script, "a")][1], "model.pt"))
    out = str(tmp_path / "eval.json")
    proc = run_py(
        "eval.py",
        "--checkpoints",
        *checkpoints,
        "--protocol",
        "custom",
        "--configs",
        "env_1",
        "--days",
        "0:2",
        "--episode-steps",
        "20",
        "--out",
        out,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, describe(proc)
    assert os.path.isfile(out), describe(proc)
    for script in SCRIPTS:  # every checkpoint is in the report
        with open(out) as f:
            assert script in f.read(), describe(proc)


def test_bad_input_gives_one_error_line(tmp_path):
    jobs, expected = [], []
    for script, cases in BAD_INPUT.items():
        for args, flag in cases:
            jobs.append((f"algos/{script}.py", [*args, "--run-name", "never"], str(tmp_path)))
            expected.append(flag)
    for proc, flag in zip(run_parallel(jobs, workers=3), expected):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0, describe(proc)
        assert "Traceback" not in proc.stderr, describe(proc)
        assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], describe(proc)
    assert not os.path.exists(tmp_path / "runs" / "never")  # nothing started
