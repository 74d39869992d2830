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
from conftest import run_py, run_script_in_process

import envs
import fused

SCRIPT = "algos/robust_vdn_rho.py"
EVAL = "eval.py"
TRAIN_ARGS = [
    "--total-episodes",
    "4",
    "--episode-steps",
    "30",
    "--learning-starts",
    "8",
    "--batch-size",
    "8",
    "--buffer-size",
    "100",
    "--target-network-frequency",
    "50",
    "--torch-threads",
    "1",
    "--log-every",
    "1",
    "--save-model",
    "--run-name",
    "X",
]
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
            _BG["after"]["eval"] = (
                d,
                out,
                (m1, m2),
                pool.submit(run_py, EVAL, "--checkpoints", m1, m2, *EVAL_ARGS, "--out", out, cwd=d),
            )
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
    return {
        n: {"proc": fut.result(), "cwd": cwd, "model": os.path.join(cwd, "runs", "X", "model.pt")}
        for n, (cwd, fut) in bg["train"].items()
    }


def progress_returns(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("episode ")]
    return [float(re.search(r"\| return (-?[0-9.]+) \|", ln).group(1)) for ln in lines]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # model.pt holds tensors and plain types only


def test_training_smoke_and_atomic_save(trained, sp):
    for run in trained.values():
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
    assert ckpt["format"] == "drigm-checkpoint-v3" and ckpt["algo"] == "robust_vdn_rho"
    assert ckpt["env"] == {
        "env": "building",
        "config": "env_1",
        "n_agents": 6,
        "n_actions": 200,
        "obs_dim": 5,
        "state_dim": 10,
    }
    assert ckpt["args"]["seed"] == 1 and ckpt["args"]["rho"] == 0.0 and ckpt["args"]["episode_steps"] == 30
    assert tuple(ckpt["q_network"]["drqn.fc1.weight_obs"].shape) == (6, 64, 5)
    assert tuple(ckpt["q_network"]["drqn.fc1.weight_onehot"].shape) == (6, 200, 64)
    assert len(ckpt["q_network"]) == 9


class ReleasedAgent(torch.nn.Module):
    """One agent's DRQN in the layout of the authors' release and of our v1 checkpoints (agents.{k}.fc1,
    .lstm, .fc_out), written with torch.nn alone: fc1 on [obs, onehot(previous action)] -> ReLU ->
    LSTM from a zero state -> last output -> ReLU -> fc_out."""

    def __init__(self, obs_dim=5, n_actions=200, hidden=64):
        super().__init__()
        self.n_actions = n_actions
        self.fc1 = torch.nn.Linear(obs_dim + n_actions, hidden)
        self.lstm = torch.nn.LSTM(hidden, hidden)
        self.fc_out = torch.nn.Linear(hidden, n_actions)

    def forward(self, obs_w, prev_w):
        """obs_w (W, B, obs_dim), prev_w (W, B) -> Q (B, n_actions)."""
        x = torch.cat([obs_w, torch.nn.functional.one_hot(prev_w, self.n_actions).float()], -1)
        out, _ = self.lstm(torch.relu(self.fc1(x)))
        return self.fc_out(torch.relu(out[-1]))


def test_v1_checkpoint_still_loads(eval_mod, tmp_path):
    """A v1 checkpoint (one torch.nn module per agent, agents.{k}.fc1.weight ...) built here from torch.nn
    modules, not from the project's converters: eval.load_checkpoint must give a network whose Q-values on
    random windows equal those of the six torch.nn agents."""
    torch.manual_seed(5)
    holder = torch.nn.Module()
    holder.agents = torch.nn.ModuleList(ReleasedAgent() for _ in range(6))
    state = holder.state_dict()
    assert len(state) == 48 and tuple(state["agents.0.fc1.weight"].shape) == (64, 205)
    ckpt = {
        "format": "drigm-checkpoint-v1",
        "algo": "robust_vdn_rho",
        "args": {"hidden_dim": 64, "share_params": False, "rho": 0.0, "window": 8, "seed": 1},
        "env": {"env": "building", "config": "env_1", "n_agents": 6, "n_actions": 200, "obs_dim": 5, "state_dim": 10},
        "q_network": state,
    }
    torch.save(ckpt, tmp_path / "v1.pt")
    label, _, net, _, _ = eval_mod.load_checkpoint(str(tmp_path / "v1.pt"), torch.device("cpu"))
    assert label == "robust_vdn_rho rho=0.0"
    obs_w, prev_w = 20.0 * torch.randn(8, 5, 6, 5), torch.randint(0, 200, (8, 5, 6))  # (W, B, N, obs), (W, B, N)
    got = net.greedy_q(obs_w, prev_w)
    with torch.no_grad():
        for k, agent in enumerate(holder.agents):
            torch.testing.assert_close(got[:, k], agent(obs_w[:, :, k], prev_w[:, :, k]), rtol=1e-5, atol=1e-5)


def rmsprop_first_step(net, loss, lr, eps, alpha=0.99):
    """The change torch.optim.RMSprop's first step makes to each parameter (square_avg starts at 0):
    -lr * g / (sqrt((1 - alpha) g^2) + eps), g the gradient of loss."""
    net.zero_grad()
    loss.backward()
    return {name: -lr * p.grad / ((1 - alpha) ** 0.5 * p.grad.abs() + eps) for name, p in net.named_parameters()}


def test_one_update_moves_the_weights_as_rmsprop_on_the_td_loss_predicts(vdn, tmp_path, monkeypatch):
    """robust_vdn_rho.py as __main__, 12 steps, exactly one gradient step (step 12): theta_1 - theta_0 must
    be what one RMSprop step (lr 5e-4, eps 1e-5) on the mean squared TD error of Eq. (15) gives, computed
    here on the same minibatch (the loop's last Batch b) with a plain-torch copy of theta_0 (the target network:
    no hard copy yet): y = r + gamma (1 - rho) (1 - terminated) sum_i max_a Q_i(h'_i, a). The same
    computation without rho, or with the loss sign flipped, must not match: the check sees both."""
    rho, gamma, lr, eps = 0.5, 0.9, 5e-4, 1e-5
    steps, step_fn = [], fused.RMSprop.step

    def counted_step(self, *a, **k):  # the optimiser steps the loop takes
        steps.append(1)
        return step_fn(self, *a, **k)

    monkeypatch.setattr(fused.RMSprop, "step", counted_step)
    g = run_script_in_process(
        SCRIPT,
        [
            "--total-episodes",
            1,
            "--episode-steps",
            12,
            "--learning-starts",
            10,
            "--batch-size",
            8,
            "--buffer-size",
            50,
            "--rho",
            rho,
            "--gamma",
            gamma,
            "--target-network-frequency",
            1000,
            "--torch-threads",
            1,
            "--run-name",
            "one",
        ],
        str(tmp_path),
    )
    assert len(steps) == 1 and g["global_step"] == 12
    theta0, theta1 = g["target_network"].state_dict(), g["q_network"].state_dict()
    rb, idx = g["rb"], g["b"].idx
    net = vdn.QNetworks(6, 5, 200, 64, use_kernel=False)
    net.load_state_dict(theta0)
    obs_w, prev_w, next_obs_w, next_prev_w = (torch.from_numpy(x) for x in rb.windows(idx))
    r, term = torch.from_numpy(rb.reward[idx]), torch.from_numpy(rb.terminated[idx])
    actions, avail = torch.from_numpy(rb.actions[idx]), torch.from_numpy(rb.next_avail[idx])

    def predicted(rho_used, sign=1.0):
        with torch.no_grad():
            v_next = net(next_obs_w, next_prev_w).masked_fill(~avail, -float("inf")).max(-1).values.sum(-1)
            y = r + gamma * (1.0 - rho_used) * (1.0 - term) * v_next
        q_tot = net(obs_w, prev_w).gather(-1, actions[..., None]).squeeze(-1).sum(-1)
        return rmsprop_first_step(net, sign * ((q_tot - y) ** 2).mean(), lr, eps)

    step = predicted(rho)
    assert theta1.keys() == step.keys()
    for key in step:
        torch.testing.assert_close(
            theta1[key] - theta0[key], step[key], rtol=1e-2, atol=2e-7, msg=lambda m, key=key: f"{key}: {m}"
        )

    def off(other):
        return max((theta1[k] - theta0[k] - other[k]).abs().max().item() for k in other)

    assert off(predicted(0.0)) > 1e-5 and off(predicted(rho, sign=-1.0)) > 1e-3


def test_progress_line_reports_the_return_of_the_episode_played(tmp_path, capsys):
    """The return on each progress line (--log-every 1) is the team return of the episode the loop played:
    replayed here in a fresh env from the stored actions (3 episodes of 30 steps, all on day 5)."""
    g = run_script_in_process(
        SCRIPT,
        [
            "--total-episodes",
            3,
            "--episode-steps",
            30,
            "--train-days",
            "5:6",
            "--learning-starts",
            8,
            "--batch-size",
            8,
            "--buffer-size",
            200,
            "--log-every",
            1,
            "--torch-threads",
            1,
            "--run-name",
            "ret",
        ],
        str(tmp_path),
    )
    printed = progress_returns(capsys.readouterr().out)
    rb, env = g["rb"], envs.make_env("building", "env_1")
    assert rb.size == 90 and len(printed) == 3
    for e in range(3):
        env.reset(5)
        total = sum(env.step(rb.actions[30 * e + t])[3] for t in range(30))
        assert printed[e] == pytest.approx(total, abs=0.051), (e, printed)  # printed with one decimal


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
    return {"dir": d, "proc": fut.result(), "out": out, "models": models}


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


@pytest.mark.parametrize(
    "protocol,configs,lo,hi",
    [
        ("paper-tables", ["env_1", "env_6"], 0, 200),
        ("climate", [f"env_{i}" for i in range(1, 7)], 0, 200),
        ("season", ["env_1"], 200, 365),
        ("climate-season", ["env_6"], 200, 365),
    ],
)
def test_protocol_day_lists_are_pinned(eval_mod, protocol, configs, lo, hi):
    """The published Tables 1-2 were evaluated on default_rng(11).integers(0, 200, 50) (paper-facts.md);
    the season protocols use default_rng(11).integers(200, 365, 50): both recomputed here."""
    got_configs, days = eval_mod.protocol_plan(eval_mod.Args(protocol=protocol))
    assert got_configs == configs
    assert days == np.random.default_rng(11).integers(lo, hi, 50).tolist()
    assert all(type(d) is int for d in days)  # plain ints: they go to env.reset and into the JSON
    assert eval_mod.protocol_plan(eval_mod.Args(protocol="custom", configs="env_2,env_5", days="7:10")) == (
        ["env_2", "env_5"],
        [7, 8, 9],
    )


def test_eval_table_several_labels_configs_and_one_seed(eval_mod, monkeypatch, tmp_path):
    """eval.main's grouping and statistics, with checkpoint loading and the rollouts replaced by known
    returns: labels A (3 seeds), B (1 seed) and C (2 seeds), checkpoints interleaved, 3 configs, 3 days.
    Per label and config: mean over seeds of each seed's mean normalised return, SE = population std /
    sqrt(n) (n = 1: 0, as eval.summarise documents), n_seeds; rows in first-seen order; the JSON written
    is the payload returned; every (checkpoint, config) rolled out once on the protocol's days."""
    labels = {"a1.pt": "A", "b1.pt": "B", "a2.pt": "A", "c1.pt": "C", "a3.pt": "A", "c2.pt": "C"}
    configs, days = ["env_1", "env_3", "env_6"], [10, 11, 12]
    rng = np.random.default_rng(0)
    returns = {(p, c): rng.uniform(-4000.0, -300.0, len(days)) for p in labels for c in configs}
    calls = []

    def fake_run(module, net, env_id, config, days_, window, episode_steps=0, device="cpu"):
        calls.append((net, env_id, config, list(days_)))
        return returns[(net, config)].copy()

    monkeypatch.setattr(
        eval_mod, "load_checkpoint", lambda path, device: (labels[path], None, path, {"env": "building"}, {"window": 8})
    )
    monkeypatch.setattr(eval_mod, "run_episodes", fake_run)
    out = tmp_path / "table.json"
    payload = eval_mod.main(
        eval_mod.Args(checkpoints=list(labels), protocol="custom", configs=",".join(configs), days="10:13", out=str(out))
    )
    torch.set_num_threads(1)
    assert sorted(calls) == sorted((p, "building", c, days) for p in labels for c in configs)
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(payload))
    assert [(e["checkpoint"], e["config"], e["label"]) for e in payload["episodes"]] == [
        (p, c, labels[p]) for p in labels for c in configs
    ]
    table = payload["table"]
    assert list(table) == ["A", "B", "C"]
    for label in table:
        seeds = [p for p in labels if labels[p] == label]
        assert list(table[label]) == configs
        for c in configs:
            per_seed = np.array([sum((R + 9000.0) / 9000.0 for R in returns[(p, c)]) / len(days) for p in seeds])
            mean = per_seed.sum() / len(seeds)
            se = math.sqrt(((per_seed - mean) ** 2).sum() / len(seeds)) / math.sqrt(len(seeds))
            row = table[label][c]
            assert row["n_seeds"] == len(seeds)
            assert row["mean"] == pytest.approx(mean, rel=1e-12)
            assert row["se"] == pytest.approx(se, rel=1e-9, abs=1e-15)
            assert (row["se"] == 0.0) == (len(seeds) == 1)


def test_starcraft_curves_final_win_rates_and_gain_over_rho0(eval_mod, tmp_path):
    """--protocol starcraft-curves on run folders written here (args.json + eval.jsonl, as the scripts write
    them): final noisy win rate per (algo, rho) and seed, and the gain of rho > 0 over rho = 0 of the same
    algo (difference of means, SE = population std / sqrt(n) of the rho > 0 finals); an algo without a
    rho = 0 run has no gain."""
    finals = {
        ("robust_vdn_rho", 0.0): [0.25, 0.5],
        ("robust_vdn_rho", 0.1): [0.75, 0.5, 1.0],
        ("robust_qmix_rho", 0.05): [0.375],
    }
    runs = []
    for (algo, rho), seeds in finals.items():
        for s, final in enumerate(seeds):
            run = tmp_path / f"{algo}_{rho}_{s}"
            run.mkdir()
            (run / "args.json").write_text(json.dumps({"exp_name": algo, "rho": rho, "seed": s}))
            points = [(100, 0.1, 0.05 * s), (200, 0.2, 0.1), (300, 0.9, final)]
            (run / "eval.jsonl").write_text(
                "".join(json.dumps({"step": st, "win_rate_clean": c, "win_rate_noisy": n}) + "\n" for st, c, n in points)
            )
            runs.append(str(run))
    payload = eval_mod.main(eval_mod.Args(protocol="starcraft-curves", runs=runs, out=str(tmp_path / "curves.json")))
    assert payload["final_noisy"] == {f"{a} rho={r}": v for (a, r), v in finals.items()}
    ((rho, gain, se),) = payload["gain_over_rho0"]["robust_vdn_rho"]
    base, robust = np.array(finals[("robust_vdn_rho", 0.0)]), np.array(finals[("robust_vdn_rho", 0.1)])
    assert rho == 0.1 and gain == pytest.approx(robust.mean() - base.mean(), rel=1e-12)
    assert se == pytest.approx(math.sqrt(((robust - robust.mean()) ** 2).mean() / 3), rel=1e-12)
    assert list(payload["gain_over_rho0"]) == ["robust_vdn_rho"]
    with open(tmp_path / "curves.json") as f:
        assert json.load(f) == json.loads(json.dumps(payload))


def test_building_checkpoint_refused_by_starcraft_protocol(trained, eval_mod, tmp_path, capsys):
    """eval.py --protocol starcraft on a building checkpoint: one error line naming --checkpoints and the
    env it was trained on, exit status != 0, no JSON written."""
    out = tmp_path / "sc.json"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_mod.main(eval_mod.Args(checkpoints=[trained["seed1a"]["model"]], protocol="starcraft", episodes=1, out=str(out)))
    torch.set_num_threads(1)
    assert exit_info.value.code not in (0, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "--checkpoints" in lines[0] and "building" in lines[0], lines
    assert not out.exists()


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
EVAL_CASES = [
    "missing-checkpoint",
    "garbage-file",
    "wrong-shape-checkpoint",
    "wrong-shape-authors-file",
    "protocol-foo",
    "custom-without-configs",
]


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
        assert ckpt["q_network"]["drqn.fc_out.weight"].shape == (6, 200, 64)  # a real key, one row short below
        ckpt["q_network"]["drqn.fc_out.weight"] = torch.zeros(6, 199, 64)
        path = os.path.join(d, "wrong_shape.pt")
        torch.save(ckpt, path)
        return ["--checkpoints", path, *custom, *small], "--checkpoints"
    if name == "wrong-shape-authors-file":
        q = load_ckpt(model)["q_network"]
        adir = os.path.join(d, "authors")
        os.makedirs(adir, exist_ok=True)
        for i in range(6):
            sd = {
                "fc1.weight": torch.cat([q["drqn.fc1.weight_obs"][i], q["drqn.fc1.weight_onehot"][i].t()], 1),
                **{
                    key: q["drqn." + key][i]
                    for key in (
                        "fc1.bias",
                        "lstm.weight_ih_l0",
                        "lstm.weight_hh_l0",
                        "lstm.bias_ih_l0",
                        "lstm.bias_hh_l0",
                        "fc_out.weight",
                        "fc_out.bias",
                    )
                },
            }
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
