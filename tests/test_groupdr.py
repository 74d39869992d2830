"""GroupDR baseline (paper F.2): algos/groupdr_estimator.py (stage 1) and algos/groupdr_{vdn,qmix,qtran}.py.

* the estimator's networks and fits: the released network's shapes and forward pass (three embeddings
  of the raw s, the one-hot joint action and t / 288), one fitting step (own head's MSE, clipped), the
  online fit (greedy behaviour over available actions, one joint epsilon coin, the replay, one Adam
  step), the trunk's first layer (a Linear on [standardised s, one-hot a_1..a_N, t / 288]) and offline
  fit (it recovers synthetic per-environment reward functions), and r_tilde = the minimum over heads
  taken per sample;
* the GroupDR TD target uses r_tilde, never the observed reward, and no rho;
* end to end with tiny budgets (subprocesses in a tmp cwd): the VDN behaviour policy (groupdr_vdn.py
  --observed-reward, episodes from env_1..env_5), the estimator (online, as released, and offline), the
  three GroupDR scripts, then eval.py on each checkpoint; every training process reports, through
  envs.BUILD_LOG, that it built env_1..env_5 and never env_6;
* the checkpoints load with torch.load(weights_only=True): estimator.pt (load_estimator; a file holding any other
  Python object is refused), the behaviour and stage-2 model.pt (runs.load_model);
* bad input (missing, garbage, foreign, pickled, mismatched estimator checkpoint; env_6 asked for): exit != 0
  with one stderr line starting with "error:", no traceback.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, _subprocess_env, describe, import_file, run_py

import runs

TRAIN = ["env_1", "env_2", "env_3", "env_4", "env_5"]
GROUPDR = ["groupdr_vdn", "groupdr_qmix", "groupdr_qtran"]
TINY = ["--episode-steps", "20", "--learning-starts", "8", "--batch-size", "8", "--buffer-size", "100", "--torch-threads", "1"]

# One subprocess that runs several repository scripts one after the other, each as __main__ with
# its own argv (interpreter start-up and the torch/sustaingym imports are paid once, not per stage),
# and after each prints its exit status and the configs envs.make_env built during it: the
# scripts' `import envs` is this very module, so envs.BUILD_LOG sees every construction.
CHAIN = """\
import json, runpy, sys, traceback
import envs
for argv in json.loads(sys.argv[1]):
    envs.BUILD_LOG.clear()
    sys.argv = argv
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    print("RESULT " + json.dumps({"script": argv[0], "rc": code, "built": sorted({c for _, c in envs.BUILD_LOG})}), flush=True)
    if code:
        break
"""


@pytest.fixture(scope="module")
def est():
    return import_file("groupdr_estimator_under_test", "algos/groupdr_estimator.py")


@pytest.fixture(scope="module")
def gdr():
    return import_file("groupdr_reward", "algos/groupdr_reward.py")


@pytest.fixture(scope="module")
def off():
    return import_file("groupdr_offline", "algos/groupdr_offline.py")


def run_chain(tmp, stages, timeout=240):
    """stages: [(script, args)] run in order by CHAIN in one subprocess with cwd tmp ->
    (CompletedProcess, {run name (its --run-name): {"script": ..., "rc": exit status, "built": configs built}})."""
    wrapper = os.path.join(tmp, "chain.py")
    with open(wrapper, "w") as f:
        f.write(CHAIN)
    argvs = [[os.path.join(ROOT, script), *map(str, args)] for script, args in stages]
    proc = subprocess.run(
        [sys.executable, wrapper, json.dumps(argvs)],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_subprocess_env(),
        check=False,
    )
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    names = [str(args[list(args).index("--run-name") + 1]) for _, args in stages]
    return proc, dict(zip(names, results))


def assert_one_error_line(proc, *needles):
    assert proc.returncode != 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    for needle in needles:
        assert needle in lines[0], describe(proc)


def run_main_in_process(script, args, cwd, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """ROOT/script as __main__ in this process (no interpreter start-up: a few ms instead of ~2 s of
    torch import), expecting it to stop through runs.fail. Any other exception propagates, i.e. the
    process would have printed a traceback. Torch's global settings are restored afterwards."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    code = exit_info.value.code
    return subprocess.CompletedProcess([script, *args], code if isinstance(code, int) else 1, out.out, out.err)


# ------------------------------------------ unit tests -----------------------------------------


def test_first_layer_is_linear_on_state_onehot_actions_and_t_over_288(gdr):
    torch.manual_seed(0)
    net = gdr.RewardEstimator(state_dim=3, n_agents=2, n_actions=4, n_heads=2, hidden_dim=8, time_norm=288.0)
    states = torch.randn(50, 3) * 5 + 20
    net.set_normalisation(states, torch.randn(50) * 3 - 30)
    a = torch.randint(0, 4, (7, 2))
    t = torch.randint(0, 288, (7,))
    s = states[:7]
    x = torch.cat(
        [
            (s - net.state_mean) / net.state_std,
            torch.nn.functional.one_hot(a, 4).flatten(1).float(),
            (t.float() / 288.0)[:, None],
        ],
        1,
    )
    want = net.heads(torch.relu(net.fc2(torch.relu(net.fc1(x))))) * net.reward_std + net.reward_mean
    torch.testing.assert_close(net(s, a, t), want, rtol=1e-5, atol=1e-4)


def test_estimator_fits_synthetic_per_environment_rewards(gdr, off):
    """r_k(s, a, t) = w_k . s + sum_i c_k[i, a_i] + d_k * t / T: linear, different in every k."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    K, D, N, A, T, n = 3, 4, 2, 5, 20, 3000
    w, c, d = rng.normal(size=(K, D)), rng.normal(size=(K, N, A)), rng.normal(size=K) * 3
    data = []
    for k in range(K):
        s = rng.normal(size=(n, D)).astype(np.float32) * 2 + 10 * k  # each env its own state region
        a = rng.integers(0, A, (n, N))
        t = rng.integers(0, T, n)
        r = s @ w[k] + c[k, np.arange(N), a].sum(-1) + d[k] * t / T - 50
        data.append({"state": s, "actions": a, "t": t, "reward": r.astype(np.float32)})
    net = gdr.RewardEstimator(D, N, A, K, hidden_dim=64, time_norm=T)
    fit = off.fit_estimator(net, data, steps=1500, batch_size=128, learning_rate=3e-3, val_fraction=0.2, rng=rng)
    for k in range(K):  # held-out error small against each environment's reward variance
        assert fit["val_mse"][k] < 0.02 * fit["reward_var"][k], fit
    # each head answers for its own environment: the others' functions differ
    s, a, t = (torch.from_numpy(np.asarray(data[0][key][:200])) for key in ("state", "actions", "t"))
    pred = net(s, a, t)
    err = (pred - torch.from_numpy(data[0]["reward"][:200])[:, None]).pow(2).mean(0)
    assert err[0] < 0.05 * err[1:].min(), err


def test_worst_case_reward_is_min_over_heads_per_sample(gdr):
    """Heads wired to output (s_0, s_1, s_0 + 5): the min must be taken row by row."""
    net = gdr.RewardEstimator(state_dim=2, n_agents=2, n_actions=3, n_heads=3, hidden_dim=4, time_norm=288.0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.fc1.weight[0, 0] = net.fc1.weight[1, 1] = 1.0  # hidden 0 = s_0, hidden 1 = s_1 (s >= 0)
        net.fc2.weight[0, 0] = net.fc2.weight[1, 1] = 1.0
        net.heads.weight[0, 0] = net.heads.weight[1, 1] = net.heads.weight[2, 0] = 1.0
        net.heads.bias[2] = 5.0
    state = torch.tensor([[1.0, 4.0], [3.0, 2.0], [7.0, 9.0]])
    actions = torch.zeros(3, 2, dtype=torch.long)
    t = torch.tensor([0, 100, 287])
    torch.testing.assert_close(net(state, actions, t), torch.tensor([[1.0, 4.0, 6.0], [3.0, 2.0, 8.0], [7.0, 9.0, 12.0]]))
    r_tilde = gdr.worst_case_reward(net, state, actions, t)
    torch.testing.assert_close(r_tilde, torch.tensor([1.0, 2.0, 7.0]))  # not min of means, not a batch min


# -------------------------------- the released estimator and its fit --------------------------------


def released_reference(net, state, actions, t, time_norm=288.0):
    """The released estimator written out with an explicit one-hot joint action (N * n_actions columns)."""
    onehot = torch.nn.functional.one_hot(actions, net.n_actions).flatten(1).float()
    e_s = torch.relu(state @ net.state_fc.weight.T + net.state_fc.bias)
    e_a = torch.relu(onehot @ net.action_fc.weight.T + net.action_fc.bias)
    e_t = torch.relu((t.float() / time_norm)[:, None] @ net.step_fc.weight.T + net.step_fc.bias)
    h = torch.relu(torch.cat([e_s, e_a, e_t], 1) @ net.combined_fc.weight.T + net.combined_fc.bias)
    return h @ net.out_fc.weight.T + net.out_fc.bias


def test_released_estimator_shapes_and_forward(gdr):
    """Building dims (10-dim state, 6 agents x 200 actions, 5 groups): three 64-wide embeddings of the raw
    state, the 1200-wide one-hot joint action and t / 288, concatenated (192) -> 64 -> 5 heads, no scaling of
    inputs or outputs; forward() = the written-out network. make_estimator's default widths: 64 / 128."""
    torch.manual_seed(0)
    net = gdr.make_estimator("released", 10, 6, 200, 5)
    shapes = {k: tuple(v.shape) for k, v in net.named_parameters()}
    assert shapes == {
        "state_fc.weight": (64, 10),
        "state_fc.bias": (64,),
        "action_fc.weight": (64, 1200),
        "action_fc.bias": (64,),
        "step_fc.weight": (64, 1),
        "step_fc.bias": (64,),
        "combined_fc.weight": (64, 192),
        "combined_fc.bias": (64,),
        "out_fc.weight": (5, 64),
        "out_fc.bias": (5,),
    }
    assert set(net.state_dict()) == set(shapes) | {"time_norm"} and float(net.time_norm) == 288.0
    state, actions, t = torch.randn(7, 10) * 10 + 20, torch.randint(0, 200, (7, 6)), torch.randint(0, 288, (7,))
    out = net(state, actions, t)
    assert out.shape == (7, 5)
    torch.testing.assert_close(out, released_reference(net, state, actions, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.fit_output(state, actions, t), out)  # the fit regresses raw rewards
    assert gdr.make_estimator("trunk", 10, 6, 200, 5).fc2.weight.shape == (128, 128)


def test_estimator_update_is_one_clipped_step_on_the_own_heads_mse(est, gdr):
    """estimator_update with plain SGD (lr 1): theta_1 - theta_0 = -clip(grad) of mean_j (r_hat_{k_j}(s_j, a_j, t_j)
    - r_j)^2, each transition's own head only, the gradient computed here on the written-out network and scaled
    by clip / ||grad|| (the clip is active: ||grad|| > clip)."""
    torch.manual_seed(1)
    rng = np.random.default_rng(0)
    net = gdr.ReleasedEstimator(3, 2, 4, 3, hidden_dim=8, time_norm=288.0)
    replay = est.BanditReplay(20, 3, 2)
    for _ in range(12):
        replay.add(rng.normal(size=3), rng.integers(0, 4, 2), rng.integers(0, 3), rng.normal() * 10 - 30, rng.integers(288))
    idx = np.array([0, 3, 4, 7, 8, 11])
    ref = copy.deepcopy(net)
    state, actions, head, reward, t = (
        torch.from_numpy(x[idx]) for x in (replay.state, replay.actions, replay.head, replay.reward, replay.t)
    )
    loss = ((released_reference(ref, state, actions, t).gather(1, head[:, None]).squeeze(1) - reward) ** 2).mean()
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in ref.parameters()))
    assert norm > 0.5
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = est.estimator_update(net, torch.optim.SGD(net.parameters(), lr=1.0), replay, idx, 0.5)
    assert got == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p - before[name], -q.grad * 0.5 / (norm + 1e-6), rtol=1e-4, atol=1e-7, msg=name)


class ConstantBehaviour(torch.nn.Module):
    """A behaviour network whose greedy action is action 0 for every agent, whatever the history."""

    def greedy_q(self, obs_w, prev_a_w):
        q = torch.zeros(obs_w.shape[1], obs_w.shape[2], 40)
        q[..., 0] = 1.0
        return q


class WideTask:
    """2 agents x 40 actions, all available, 25 steps, reward = -sum of the actions."""

    n_agents, n_actions, obs_dim, state_dim, episode_limit = 2, 40, 2, 3, 25

    def reset(self, day):
        self.t = 0
        return np.zeros((2, 2), np.float32), np.zeros(3, np.float32), np.ones((2, 40), bool)

    def step(self, actions):
        self.t += 1
        return (
            np.zeros((2, 2), np.float32),
            np.zeros(3, np.float32),
            np.ones((2, 40), bool),
            -float(np.sum(actions)),
            False,
            self.t >= 25,
            {},
        )


@pytest.mark.parametrize("joint_coin", [True, False])
def test_online_fit_flips_one_joint_coin(est, joint_coin, gdr):
    """Epsilon 0.5, a behaviour whose greedy action is 0: with the joint coin (released) a step is all-greedy or
    all-random, so steps where exactly one agent plays 0 only occur when a random action happens to be 0
    (~1/40 of the random steps); with one coin per agent they are about half the steps. About half the
    steps are all-greedy with the joint coin."""
    vdn = import_file("groupdr_vdn_for_estimator", "algos/groupdr_vdn.py")
    torch.manual_seed(0)
    net = gdr.ReleasedEstimator(3, 2, 40, 1, hidden_dim=4)
    fit = est.fit_online(
        net,
        [WideTask()],
        (vdn, ConstantBehaviour(), 2),
        8,
        (0, 10),
        0.5,
        joint_coin,
        0,
        500,
        400,
        2,
        5e-4,
        10.0,
        np.random.default_rng(0),
    )
    assert fit["updates"] == 0 and fit["transitions"] == 200
    greedy = fit["replay"].actions[:200] == 0
    mixed, all_greedy = (greedy.sum(1) == 1).mean(), greedy.all(1).mean()
    if joint_coin:
        assert mixed < 0.06 and 0.4 < all_greedy < 0.6, (mixed, all_greedy)
    else:
        assert mixed > 0.35, mixed


def test_online_fit_one_update_is_one_adam_step(est, gdr):
    """fit_online on MaskedTask (tests/test_loops_groupdr.py: env_1 and env_2 as heads 0, 1; one unavailable
    action per agent and step), epsilon 0, two days of 4 steps, batch 6, one update every 8 stored transitions:
    the replay holds (s_t, a_t, head, r_t, t) as the task produced them, every action is the greedy action of the
    behaviour network over the available actions (windows built here), and the only update is the closed-form
    first Adam step (lr 5e-4: -lr g / (|g| + 1e-8)) of the clipped gradient of the own-head MSE on the last
    batch, computed here on the written-out network."""
    import test_loops_groupdr as loops

    vdn = import_file("groupdr_vdn_for_estimator", "algos/groupdr_vdn.py")
    torch.manual_seed(0)
    behaviour = vdn.QNetworks(loops.N, loops.OBS, loops.A, 8, use_kernel=False)
    net = gdr.ReleasedEstimator(loops.STATE, loops.N, loops.A, 2, hidden_dim=8, time_norm=4.0)
    theta0 = copy.deepcopy(net)
    tasks = [loops.MaskedTask("env_1"), loops.MaskedTask("env_2")]
    fit = est.fit_online(
        net, tasks, (vdn, behaviour, loops.WINDOW), 2, (0, 100), 0.0, True, 0, 50, 6, 8, 5e-4, 0.5, np.random.default_rng(4)
    )
    replay, idx = fit["replay"], np.array(fit["last_batch"])
    assert fit["updates"] == 1 and fit["transitions"] == replay.size == 8 and len(set(idx.tolist())) == 6
    for i in range(replay.size):
        k, _day, t = loops.decode(replay, i)
        assert replay.head[i] == k - 1 and replay.t[i] == t == i % 4 and fit["heads"][i // 4] == k - 1
        assert replay.reward[i] == pytest.approx(loops.reward_of(k, t, replay.actions[i]), abs=1e-5)
    obs_w, prev_w, _, _ = loops.windows(replay, np.arange(8))
    with torch.no_grad():
        q = behaviour(obs_w, prev_w)
    avail = np.stack([loops.avail_of(t) for t in replay.t[:8]])
    np.testing.assert_array_equal(replay.actions[:8], loops.masked(q, avail).argmax(-1).numpy())
    state, actions, head, reward, t = (
        torch.from_numpy(x[idx]) for x in (replay.state, replay.actions, replay.head, replay.reward, replay.t)
    )
    loss = ((released_reference(theta0, state, actions, t, 4.0).gather(1, head[:, None]).squeeze(1) - reward) ** 2).mean()
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in theta0.parameters()))
    assert norm > 0.5  # the clip is active (the first Adam step does not show it; estimator_update's test does)
    for (name, p), p0 in zip(net.named_parameters(), theta0.parameters()):
        g = p0.grad * min(1.0, 0.5 / (float(norm) + 1e-6))
        torch.testing.assert_close(p.detach() - p0.detach(), -5e-4 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-9, msg=name)


@pytest.mark.parametrize("name", GROUPDR)
def test_groupdr_target_uses_r_tilde_and_no_rho(name):
    mod = import_file(f"{name}_under_test", f"algos/{name}.py")
    r_tilde, next_v = torch.tensor([-3.0, -1.0]), torch.tensor([-100.0, -50.0])
    y = mod.groupdr_target(r_tilde, next_v, torch.tensor([0.0, 1.0]), 0.997)
    torch.testing.assert_close(y, torch.tensor([-3.0 - 99.7, -1.0]))
    fields = mod.Args.__dataclass_fields__
    assert "rho" not in fields and "worst_value" not in fields and fields["estimator_checkpoint"].default == ""
    assert mod.Args().train_configs.split(",") == TRAIN


def test_default_configs_and_env6_refused(est, gdr):
    assert gdr.parse_configs(gdr.TRAIN_CONFIGS, allow_env6=False) == TRAIN
    with pytest.raises(Exception, match="--allow-env6"):
        gdr.parse_configs("env_1,env_6", allow_env6=False)
    assert gdr.parse_configs("env_1,env_6", allow_env6=True) == ["env_1", "env_6"]


# ---------------------------------------- end to end --------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Behaviour VDN (groupdr_vdn.py --observed-reward, as released) -> the estimator (online as released, and
    the offline trunk fit) -> the three GroupDR scripts on the online estimator, all tiny, in one tmp cwd."""
    tmp = str(tmp_path_factory.mktemp("groupdr"))
    stages = [
        (
            "algos/groupdr_vdn.py",
            ["--observed-reward", "--single-coin", "--total-episodes", "1", *TINY, "--save-model", "--run-name", "b"],
        ),
        (
            "algos/groupdr_estimator.py",
            [
                "--behaviour-checkpoint",
                "runs/b/model.pt",
                "--episodes",
                "3",
                "--episode-steps",
                "20",
                "--batch-size",
                "16",
                "--torch-threads",
                "1",
                "--run-name",
                "est",
            ],
        ),
        (
            "algos/groupdr_estimator.py",
            [
                "--behaviour-checkpoint",
                "runs/b/model.pt",
                "--fit",
                "offline",
                "--architecture",
                "trunk",
                "--per-agent-coins",
                "--episodes-per-config",
                "2",
                "--parallel-envs",
                "2",
                "--episode-steps",
                "20",
                "--fit-steps",
                "20",
                "--fit-batch-size",
                "16",
                "--torch-threads",
                "1",
                "--run-name",
                "est_offline",
            ],
        ),
    ] + [
        (
            f"algos/{name}.py",
            [
                "--estimator-checkpoint",
                "runs/est/estimator.pt",
                "--total-episodes",
                "2",
                *TINY,
                "--save-model",
                "--run-name",
                name,
            ],
        )
        for name in GROUPDR
    ]
    proc, results = run_chain(tmp, stages)
    assert proc.returncode == 0 and len(results) == len(stages), describe(proc)
    return tmp, proc, results


def test_pipeline_trains_on_env_1_to_5_only(pipeline):
    _, proc, results = pipeline
    assert all(r["rc"] == 0 for r in results.values()), describe(proc)
    for name in ["b", "est", "est_offline", *GROUPDR]:
        assert results[name]["built"] == TRAIN, (name, results[name])  # every training env built, env_6 never
    assert "Traceback" not in proc.stderr, describe(proc)


def test_estimator_checkpoint_contents(pipeline, est, gdr):
    """Both estimator checkpoints: format, heads env_1..env_5, time t / 288, the architecture and its width (the
    released 64-wide network fitted online over the 3 behaviour episodes with the joint coin; the offline trunk,
    128 wide, with per-agent coins), the behaviour policy (groupdr_vdn.py --observed-reward), and load_estimator
    rebuilds each network with the saved weights."""
    tmp, _, _ = pipeline
    for run, architecture, width, heads_key in [
        ("est", "released", 64, "out_fc.weight"),
        ("est_offline", "trunk", 128, "heads.weight"),
    ]:
        ckpt = torch.load(os.path.join(tmp, f"runs/{run}/estimator.pt"), weights_only=True)  # tensors, plain types
        assert ckpt["format"] == "drigm-groupdr-estimator-v1"
        assert ckpt["configs"] == TRAIN and ckpt["time_norm"] == 288.0
        assert (ckpt["n_agents"], ckpt["n_actions"], ckpt["state_dim"]) == (6, 200, 10)
        assert ckpt["architecture"] == architecture and ckpt["hidden_dim"] == width
        assert ckpt["estimator"][heads_key].shape == (5, width)
        assert ckpt["behaviour"]["algo"] == "groupdr_vdn" and ckpt["behaviour"]["joint_coin"] == (run == "est")
        assert ckpt["fit"]["mode"] == ("online" if run == "est" else "offline")
        assert not os.path.exists(os.path.join(tmp, f"runs/{run}/estimator.pt.tmp"))
        net, _ = gdr.load_estimator(os.path.join(tmp, f"runs/{run}/estimator.pt"), 6, 200, 10)
        assert type(net).__name__ == ("ReleasedEstimator" if run == "est" else "RewardEstimator")
        for key, value in ckpt["estimator"].items():
            assert torch.equal(net.state_dict()[key], value), key
    fit = torch.load(os.path.join(tmp, "runs/est/estimator.pt"), weights_only=True)["fit"]
    assert fit["episodes"] == 3 and fit["transitions"] == 60 and sum(fit["episodes_per_head"]) == 3
    assert fit["updates"] == (60 - 16) // 2 + 1  # one every 2 stored transitions once 16 are stored


def test_groupdr_checkpoints_evaluate_with_eval_py(pipeline, eval_mod, monkeypatch):
    """eval.py, unchanged, on each GroupDR checkpoint: in-process one by one (eval.main), then all three
    in one `python eval.py` process that must exit 0."""
    tmp, _, _ = pipeline
    monkeypatch.chdir(tmp)
    common = ["--protocol", "custom", "--configs", "env_1", "--days", "0:2", "--episode-steps", "20"]
    for name in GROUPDR:
        ckpt = runs.load_model(os.path.join(tmp, "runs", name, "model.pt"))  # torch.load(weights_only=True)
        assert ckpt["format"] == runs.MODEL_FORMATS[-1] and ckpt["algo"] == name
        assert ckpt["env"]["config"] == ",".join(TRAIN) and ckpt["estimator_configs"] == TRAIN
        threads = torch.get_num_threads()
        payload = eval_mod.main(
            eval_mod.Args(
                checkpoints=[f"runs/{name}/model.pt"],
                protocol="custom",
                configs="env_1",
                days="0:2",
                episode_steps=20,
                out=f"results/{name}.json",
            )
        )
        torch.set_num_threads(threads)
        assert len(payload["episodes"]) == 1 and len(payload["episodes"][0]["returns"]) == 2
    proc = run_py(
        "eval.py", "--checkpoints", *[f"runs/{n}/model.pt" for n in GROUPDR], *common, "--out", "results/all.json", cwd=tmp
    )
    assert proc.returncode == 0, describe(proc)
    with open(os.path.join(tmp, "results/all.json")) as f:
        assert [e["checkpoint"] for e in json.load(f)["episodes"]] == [f"runs/{n}/model.pt" for n in GROUPDR]


def test_groupdr_vdn_update_regresses_on_r_tilde(pipeline):
    """groupdr_vdn.py as __main__ (in this process) with the pipeline's estimator, 12 steps, exactly one
    gradient step: theta_1 - theta_0 must be one RMSprop step (lr 5e-4, eps 1e-5) on the mean squared TD
    error towards y = r_tilde + gamma (1 - terminated) sum_i max_a Q_i(h'_i, a; theta_0), computed here on
    the loop's minibatch, r_tilde = min over the estimator's heads per sample of its outputs for the stored
    (s, a, t). The same step with the observed reward instead of r_tilde must not match."""
    tmp, _, _ = pipeline
    mod = import_file("groupdr_vdn_under_test", "algos/groupdr_vdn.py")
    gamma, lr, eps = 0.9, 5e-4, 1e-5
    import test_loops_groupdr as loops

    g = loops.run_counting_updates(
        "algos/groupdr_vdn.py",
        [
            "--estimator-checkpoint",
            os.path.join(tmp, "runs/est/estimator.pt"),
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
            "--gamma",
            gamma,
            "--target-network-frequency",
            1000,
            "--torch-threads",
            1,
            "--run-name",
            "one_update",
        ],
        tmp,
    )
    assert g["updates"] == [12]  # the one gradient step: env step 12
    theta0, theta1, rb, idx = g["target_network"].state_dict(), g["q_network"].state_dict(), g["rb"], g["b"].idx
    net = mod.QNetworks(6, 5, 200, 64, use_kernel=False)
    net.load_state_dict(theta0)
    obs_w, prev_w, next_obs_w, next_prev_w = (torch.from_numpy(x) for x in rb.windows(idx))
    actions = torch.from_numpy(rb.actions[idx])
    with torch.no_grad():
        heads = g["estimator"](torch.from_numpy(rb.state[idx]), actions, torch.from_numpy(rb.t[idx]))
        assert heads.shape == (len(idx), 5)
        r_tilde = heads.min(-1).values
        v_next = net(next_obs_w, next_prev_w).masked_fill(~torch.from_numpy(rb.next_avail[idx]), -float("inf"))
        bootstrap = gamma * (1.0 - torch.from_numpy(rb.terminated[idx])) * v_next.max(-1).values.sum(-1)

    def step_towards(reward):
        net.zero_grad()
        q_tot = net(obs_w, prev_w).gather(-1, actions[..., None]).squeeze(-1).sum(-1)
        ((q_tot - (reward + bootstrap)) ** 2).mean().backward()
        return {k: -lr * p.grad / (0.1 * p.grad.abs() + eps) for k, p in net.named_parameters()}  # RMSprop, 1st step

    step = step_towards(r_tilde)
    for key in step:
        torch.testing.assert_close(
            theta1[key] - theta0[key], step[key], rtol=1e-2, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
        )
    observed = step_towards(torch.from_numpy(rb.reward[idx]))
    assert max((theta1[k] - theta0[k] - observed[k]).abs().max().item() for k in observed) > 1e-5


def test_bad_estimator_checkpoints(pipeline, monkeypatch, capsys):
    """Every bad input of the four scripts (estimator checkpoint missing / unreadable / foreign / holding a Python
    object (weights_only refuses it) / mismatched / with an env_6 head, env_6 asked for, --observed-reward with an
    estimator, another --env, the trunk fitted online, an unknown --fit, no behaviour policy): exit != 0 with one
    stderr line "error: ...", no traceback."""
    tmp, _, _ = pipeline
    with open(os.path.join(tmp, "garbage.pt"), "wb") as f:
        f.write(b"this is not a torch file")
    ckpt = torch.load(os.path.join(tmp, "runs/est/estimator.pt"), weights_only=True)
    torch.save({**ckpt, "args": argparse.Namespace(**ckpt["args"])}, os.path.join(tmp, "pickled.pt"))  # a Python object
    torch.save({**ckpt, "configs": ["env_1", "env_2", "env_3", "env_4", "env_6"]}, os.path.join(tmp, "with_env6.pt"))
    ckpt["n_actions"] = 3
    torch.save(ckpt, os.path.join(tmp, "mismatched.pt"))
    cases = [
        ("groupdr_vdn", [], ["--estimator-checkpoint is required"]),
        ("groupdr_vdn", ["--estimator-checkpoint", "missing.pt"], ["--estimator-checkpoint", "missing.pt"]),
        ("groupdr_qmix", ["--estimator-checkpoint", "garbage.pt"], ["--estimator-checkpoint", "cannot read"]),
        ("groupdr_qtran", ["--estimator-checkpoint", "runs/b/model.pt"], ["--estimator-checkpoint", "not a GroupDR"]),
        ("groupdr_qmix", ["--estimator-checkpoint", "pickled.pt"], ["--estimator-checkpoint", "cannot read", "plain types"]),
        ("groupdr_vdn", ["--estimator-checkpoint", "mismatched.pt"], ["--estimator-checkpoint", "n_actions 3 != 200"]),
        (
            "groupdr_vdn",
            ["--estimator-checkpoint", "runs/est/estimator.pt", "--train-configs", "env_1,env_6"],
            ["--train-configs", "--allow-env6"],
        ),
        ("groupdr_qtran", ["--estimator-checkpoint", "with_env6.pt"], ["--estimator-checkpoint", "env_6", "--allow-env6"]),
        (
            "groupdr_vdn",
            ["--observed-reward", "--estimator-checkpoint", "runs/est/estimator.pt"],
            ["--estimator-checkpoint and --observed-reward exclude each other"],
        ),
        (
            "groupdr_qmix",
            ["--estimator-checkpoint", "runs/est/estimator.pt", "--env", "matrix"],
            ["--env must be one of building"],
        ),
    ]
    cases += [
        ("groupdr_estimator", ["--configs", "env_1,env_6"], ["--configs", "env_6", "--allow-env6"]),
        ("groupdr_estimator", [], ["--behaviour-checkpoint", "groupdr_vdn.py --observed-reward"]),
        (
            "groupdr_estimator",
            ["--behaviour-checkpoint", "runs/b/model.pt", "--architecture", "trunk"],
            ["--architecture trunk needs --fit offline"],
        ),
        ("groupdr_estimator", ["--behaviour-checkpoint", "runs/b/model.pt", "--fit", "later"], ["--fit must be one of"]),
        ("groupdr_estimator", ["--behaviour-checkpoint", "garbage.pt"], ["--behaviour-checkpoint", "cannot read"]),
    ]
    for name, args, want in cases:
        extra = [] if name == "groupdr_estimator" else ["--total-episodes", "1", *TINY]
        proc = run_main_in_process(f"algos/{name}.py", [*args, *extra], tmp, monkeypatch, capsys)
        assert_one_error_line(proc, *want)
    # and once as a real process: exit status != 0, one line, no traceback
    proc = run_py("algos/groupdr_qmix.py", "--estimator-checkpoint", "mismatched.pt", "--torch-threads", "1", cwd=tmp)
    assert_one_error_line(proc, "--estimator-checkpoint", "n_actions 3 != 200")
