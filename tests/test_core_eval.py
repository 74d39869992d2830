"""algos/robust_vdn_rho.py and eval.py run as scripts (subprocesses, tmp cwd, tiny budgets).

* determinism: same --seed -> identical saved weights and progress returns; another seed differs;
* smoke: training saves runs/X/model.pt atomically; eval.py on it writes the expected JSON, and
  its returns equal a from-scratch greedy rollout done here; eval's grouping over seeds;
* bad input: exit code != 0, stderr exactly one line "error: ..." naming the flag, no traceback.
"""

import json
import math
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import envs
from conftest import run_py

SCRIPT = "algos/robust_vdn_rho.py"
EVAL = "eval.py"
TRAIN_ARGS = ["--total-episodes", "4", "--episode-steps", "30", "--learning-starts", "8", "--batch-size", "8",
              "--buffer-size", "100", "--target-network-frequency", "50", "--torch-threads", "1", "--log-every", "1",
              "--save-model", "--run-name", "X"]
N_EPISODES, EPISODE_STEPS = 4, 30
TRAIN_SEEDS = {"seed1a": 1, "seed2": 2, "seed1b": 1}  # the two eval needs first
EVAL_ARGS = ["--protocol", "custom", "--configs", "env_1", "--days", "0:3", "--episode-steps", "20"]


# ------------------------------------------------------------------------------------------------
# Background jobs. Every subprocess of this module is started as soon as the session has collected
# its tests (conftest's pytest_collection_finish calls start_background_jobs), two at a time, so
# that they run while the in-process tests of the other files do: the machine has 2 shared cores
# and these scripts spend most of their time importing torch. Fixtures just wait for the results.
# ------------------------------------------------------------------------------------------------
_BG: dict = {}
_BG_LOCK = threading.Lock()


def start_background_jobs():
    with _BG_LOCK:
        if _BG:
            return _BG
        base = tempfile.mkdtemp(prefix="test_core_eval_")
        pool = ThreadPoolExecutor(max_workers=2)
        _BG.update(base=base, pool=pool, train={}, bad={}, after={})
        for name, seed in TRAIN_SEEDS.items():
            cwd = os.path.join(base, name)
            os.makedirs(cwd)
            _BG["train"][name] = (cwd, pool.submit(run_py, SCRIPT, *TRAIN_ARGS, "--seed", str(seed), cwd=cwd))
        for name, (argv, flag) in SCRIPT_CASES.items():
            cwd = os.path.join(base, "bad", name)
            os.makedirs(cwd)
            fut = pool.submit(run_py, SCRIPT, *argv, "--torch-threads", "1", "--total-episodes", "1", cwd=cwd)
            _BG["bad"][name] = ("script", flag, cwd, fut)

        def after_training():  # eval jobs need the checkpoints of seeds 1 and 2
            m1, m2 = (os.path.join(_BG["train"][n][0], "runs", "X", "model.pt") for n in ("seed1a", "seed2"))
            for n in ("seed1a", "seed2"):
                _BG["train"][n][1].result()
            d = os.path.join(base, "eval")
            os.makedirs(d)
            out = os.path.join(d, "two.json")
            _BG["after"]["eval"] = (d, out, (m1, m2), pool.submit(run_py, EVAL, "--checkpoints", m1, m2, *EVAL_ARGS,
                                                                  "--out", out, cwd=d))
            bad_dir = os.path.join(base, "bad_eval")
            os.makedirs(bad_dir)
            for name in EVAL_CASES:
                try:
                    argv, flag = eval_case(name, bad_dir, m1)
                except Exception as err:  # noqa: BLE001 - e.g. training failed: reported by the test
                    _BG["bad"][name] = ("eval", None, bad_dir, err)
                    continue
                _BG["bad"][name] = ("eval", flag, bad_dir, pool.submit(run_py, EVAL, *argv, cwd=bad_dir))

        _BG["chain"] = threading.Thread(target=after_training, daemon=True)
        _BG["chain"].start()
        return _BG


def stop_background_jobs():
    with _BG_LOCK:
        if not _BG:
            return
        _BG["chain"].join(timeout=300)
        _BG["pool"].shutdown(wait=True)
        shutil.rmtree(_BG["base"], ignore_errors=True)
        _BG.clear()


@pytest.fixture(scope="module")
def bg():
    jobs = start_background_jobs()  # no-op when conftest's hook already started them
    yield jobs
    stop_background_jobs()


@pytest.fixture(scope="module")
def trained(bg):
    """Three training runs: seed 1 twice (separate cwds) and seed 2."""
    return {n: dict(proc=fut.result(), cwd=cwd, model=os.path.join(cwd, "runs", "X", "model.pt"))
            for n, (cwd, fut) in bg["train"].items()}


def progress_returns(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("episode ")]
    return [float(re.search(r"\| return (-?[0-9.]+) \|", ln).group(1)) for ln in lines]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_training_smoke_and_atomic_save(trained, sp):
    for name, run in trained.items():
        p = run["proc"]
        assert p.returncode == 0, sp.describe(p)
        assert "Traceback" not in p.stderr, sp.describe(p)
        assert os.path.isfile(run["model"]), sp.describe(p)
        run_dir = os.path.dirname(run["model"])
        leftovers = [f for _, _, fs in os.walk(run["cwd"]) for f in fs if ".tmp" in f]
        assert leftovers == [], leftovers
        assert f"model saved to {os.path.join('runs', 'X', 'model.pt')}" in p.stdout
        assert len(progress_returns(p.stdout)) == N_EPISODES, sp.describe(p)
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    ckpt = load_ckpt(trained["seed1a"]["model"])
    assert ckpt["format"] == "drigm-checkpoint-v2" and ckpt["algo"] == "robust_vdn_rho"
    assert ckpt["env"] == {"env": "building", "config": "env_1", "n_agents": 6, "n_actions": 200,
                           "obs_dim": 5, "state_dim": 10}
    assert ckpt["args"]["seed"] == 1 and ckpt["args"]["rho"] == 0.0 and ckpt["args"]["episode_steps"] == 30
    assert tuple(ckpt["q_network"]["drqn.fc1_obs"].shape) == (6, 64, 5)
    assert tuple(ckpt["q_network"]["drqn.fc1_table"].shape) == (6, 200, 64)
    assert len(ckpt["q_network"]) == 9


def test_v1_checkpoint_still_loads(trained, vdn, eval_mod, tmp_path):
    """Checkpoints of the first layout (one module per agent, agents.{k}.fc1.weight ...) load into
    the stacked network with the very same weights."""
    ckpt = load_ckpt(trained["seed1a"]["model"])
    v2 = ckpt["q_network"]
    net = vdn.QNetworks(6, 5, 200, 64)
    net.load_state_dict(v2)
    ckpt["format"] = "drigm-checkpoint-v1"
    ckpt["q_network"] = {f"agents.{k}.{key}": v for k in range(6) for key, v in eval_mod.agent_state_dict(net.drqn, k).items()}
    assert tuple(ckpt["q_network"]["agents.0.fc1.weight"].shape) == (64, 205) and len(ckpt["q_network"]) == 48
    torch.save(ckpt, tmp_path / "v1.pt")
    _, _, net, _, _ = eval_mod.load_checkpoint(str(tmp_path / "v1.pt"), torch.device("cpu"))
    for key, value in v2.items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=0, rtol=0)


def test_training_changes_the_weights(trained, vdn):
    """The script seeds torch before building theta: the same seed here gives its initial weights."""
    torch.manual_seed(1)
    init = vdn.QNetworks(6, 5, 200, 64).state_dict()
    saved = load_ckpt(trained["seed1a"]["model"])["q_network"]
    assert saved.keys() == init.keys()
    assert any(not torch.equal(saved[k], init[k]) for k in init)


def test_progress_returns_are_plausible(trained):
    # 30 steps of a building day: every reward is negative and bounded well above -9000 per day
    for run in trained.values():
        for r in progress_returns(run["proc"].stdout):
            assert -9000.0 < r < 0.0


def test_same_seed_same_run(trained):
    a, b = load_ckpt(trained["seed1a"]["model"]), load_ckpt(trained["seed1b"]["model"])
    assert a["q_network"].keys() == b["q_network"].keys()
    for k in a["q_network"]:
        assert torch.equal(a["q_network"][k], b["q_network"][k]), k
    assert progress_returns(trained["seed1a"]["proc"].stdout) == progress_returns(trained["seed1b"]["proc"].stdout)


def test_other_seed_differs(trained):
    a, c = load_ckpt(trained["seed1a"]["model"]), load_ckpt(trained["seed2"]["model"])
    assert any(not torch.equal(a["q_network"][k], c["q_network"][k]) for k in a["q_network"])
    assert progress_returns(trained["seed1a"]["proc"].stdout) != progress_returns(trained["seed2"]["proc"].stdout)


# ------------------------------------------------------------------------------------------------
# eval.py
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(trained, bg):
    """One eval.py call on two checkpoints of the same method (seeds 1 and 2): it serves both the
    smoke test (3 episodes per config for each checkpoint) and the grouping test."""
    bg["chain"].join()
    d, out, models, fut = bg["after"]["eval"]
    return dict(dir=d, proc=fut.result(), out=out, models=models)


def read_json(proc, path, sp):
    assert proc.returncode == 0, sp.describe(proc)
    assert "Traceback" not in proc.stderr, sp.describe(proc)
    assert os.path.isfile(path) and not os.path.exists(path + ".tmp")
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def greedy_rollout_here(vdn, model_path, day, steps, W=8):
    """Decentralised greedy execution written from scratch: one env, explicit windows, forward()."""
    net = vdn.QNetworks(6, 5, 200, 64)
    net.load_state_dict(load_ckpt(model_path)["q_network"])
    env = envs.make_env("building", "env_1")
    obs, _, avail = env.reset(day)
    obs_seq, act_seq, total = [obs], [], 0.0
    for t in range(steps):
        obs_w = np.stack([obs_seq[tau] if tau >= 0 else np.zeros((6, 5), np.float32) for tau in range(t - W + 1, t + 1)])
        prev_w = np.stack([act_seq[tau - 1] if tau >= 1 else np.zeros(6, np.int64) for tau in range(t - W + 1, t + 1)])
        q = net(torch.from_numpy(obs_w)[:, None], torch.from_numpy(prev_w)[:, None])[0].numpy()
        actions = np.where(avail, q, -np.inf).argmax(-1)
        obs, _, avail, r, term, trunc, _ = env.step(actions)
        total += r
        obs_seq.append(obs)
        act_seq.append(actions)
        if term or trunc:
            break
    return total


def test_eval_smoke_json(evaluated, vdn, sp):
    out = read_json(evaluated["proc"], evaluated["out"], sp)
    assert "wrote" in evaluated["proc"].stdout
    assert out["protocol"] == "custom" and out["configs"] == ["env_1"] and out["days"] == [0, 1, 2]
    assert [e["checkpoint"] for e in out["episodes"]] == list(evaluated["models"])  # one entry per (ckpt, config)
    for ep in out["episodes"]:
        assert ep["config"] == "env_1" and ep["days"] == [0, 1, 2]
        assert ep["label"] == "robust_vdn_rho rho=0.0"
        assert len(ep["returns"]) == 3 and len(ep["normalised"]) == 3
        for R, nr in zip(ep["returns"], ep["normalised"]):
            assert nr == pytest.approx((R + 9000.0) / 9000.0, rel=1e-12)  # Eq. (33)
            assert R < 0
    # the returns are those of greedy execution of the saved weights, 20 steps from each day
    ep = out["episodes"][0]
    for day, R in zip([0, 1, 2], ep["returns"]):
        assert R == pytest.approx(greedy_rollout_here(vdn, evaluated["models"][0], day, 20), rel=1e-9)


def test_eval_groups_seeds_of_one_method(evaluated, sp):
    out = read_json(evaluated["proc"], evaluated["out"], sp)
    assert list(out["table"]) == ["robust_vdn_rho rho=0.0"]  # one row for the two seeds
    row = out["table"]["robust_vdn_rho rho=0.0"]["env_1"]
    assert row["n_seeds"] == 2
    # by hand: each seed's mean over days, then mean and population std / sqrt(2) over seeds
    m1 = sum((R + 9000.0) / 9000.0 for R in out["episodes"][0]["returns"]) / 3
    m2 = sum((R + 9000.0) / 9000.0 for R in out["episodes"][1]["returns"]) / 3
    assert m1 != m2
    assert row["mean"] == pytest.approx((m1 + m2) / 2, rel=1e-12)
    pop_std = abs(m1 - m2) / 2  # population std of two numbers
    assert row["se"] == pytest.approx(pop_std / math.sqrt(2), rel=1e-9)
    assert row["se"] != pytest.approx(abs(m1 - m2) / math.sqrt(2) / math.sqrt(2), rel=1e-6)  # not the sample std


def test_eval_summarise_population_std(eval_mod):
    # 0.8, 0.9, 1.0: mean 0.9, population variance (0.01 + 0 + 0.01) / 3, SE = sqrt(0.02/3) / sqrt(3)
    mean, se = eval_mod.summarise([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9, abs=1e-12)
    assert se == pytest.approx(math.sqrt(0.02 / 3) / math.sqrt(3), rel=1e-9)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
SCRIPT_CASES = {
    "rho-negative": (["--rho", "-0.1"], "--rho"),
    "rho-above-1": (["--rho", "1.5"], "--rho"),
    "env-foo": (["--env", "foo"], "--env"),
    "train-config-env_9": (["--train-config", "env_9"], "--train-config"),
    "worst-value-foo": (["--worst-value", "foo"], "--worst-value"),
    "buffer-not-larger-than-window": (["--buffer-size", "8", "--window", "8"], "--buffer-size"),
}
EVAL_CASES = ["missing-checkpoint", "garbage-file", "wrong-shape-checkpoint", "wrong-shape-authors-file",
              "protocol-foo", "custom-without-configs"]


def eval_case(name, d, model):
    """-> (argv, flag) for one bad eval.py call; writes the bad files it needs into d."""
    small = ["--days", "0:1", "--episode-steps", "2", "--out", os.path.join(d, f"{name}.json")]
    custom = ["--protocol", "custom", "--configs", "env_1"]
    if name == "missing-checkpoint":
        return ["--checkpoints", os.path.join(d, "nope", "model.pt"), *custom, *small], "--checkpoints"
    if name == "garbage-file":
        path = os.path.join(d, "garbage.pt")
        with open(path, "wb") as f:
            f.write(b"this is not a torch file\x00\x01\x02")
        return ["--checkpoints", path, *custom, *small], "--checkpoints"
    if name == "wrong-shape-checkpoint":
        ckpt = load_ckpt(model)
        ckpt["q_network"]["drqn.fc_out_weight"] = torch.zeros(6, 199, 64)
        path = os.path.join(d, "wrong_shape.pt")
        torch.save(ckpt, path)
        return ["--checkpoints", path, *custom, *small], "--checkpoints"
    if name == "wrong-shape-authors-file":
        q = load_ckpt(model)["q_network"]
        adir = os.path.join(d, "authors")
        os.makedirs(adir, exist_ok=True)
        for i in range(6):
            sd = {"fc1.weight": torch.cat([q["drqn.fc1_obs"][i], q["drqn.fc1_table"][i].t()], 1),
                  **{key: q["drqn." + key.replace(".", "_").replace("_l0", "")][i] for key in
                     ("fc1.bias", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
                      "fc_out.weight", "fc_out.bias")}}
            if i == 4:
                sd["fc1.weight"] = torch.zeros(64, 204)  # one input column short
            torch.save(sd, os.path.join(adir, f"agent_{i}_q_network.pt"))
        return ["--authors-dir", adir, *custom, *small], "--authors-dir"
    if name == "protocol-foo":
        return ["--checkpoints", model, "--protocol", "foo", *small], "--protocol"
    if name == "custom-without-configs":
        return ["--checkpoints", model, "--protocol", "custom", *small], "--configs"
    raise KeyError(name)


@pytest.fixture(scope="module")
def bad_runs(bg):
    bg["chain"].join()
    runs = {}
    for name, (kind, flag, cwd, fut) in bg["bad"].items():
        if isinstance(fut, Exception):
            raise fut
        runs[name] = (kind, flag, cwd, fut.result())
    return runs


@pytest.mark.parametrize("case", list(SCRIPT_CASES) + EVAL_CASES)
def test_bad_input_one_error_line(bad_runs, case, sp):
    kind, flag, cwd, p = bad_runs[case]
    assert p.returncode != 0, sp.describe(p)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, sp.describe(p)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), sp.describe(p)
    assert lines[0].startswith("error:"), sp.describe(p)
    assert flag in lines[0], sp.describe(p)
    if kind == "script":
        assert not os.path.exists(os.path.join(cwd, "runs")), "a rejected run must not create its run folder"
    else:
        assert not os.path.exists(os.path.join(cwd, f"{case}.json"))
