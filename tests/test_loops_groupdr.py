"""The training loops of algos/groupdr_{vdn,qmix,qtran}.py, checked step by step on a tiny task whose every
quantity is known in closed form (issue 16 items 1-4 for the three GroupDR scripts).

``MaskedTask`` is monkeypatched into ``envs.make_env``: 2 agents, 3 actions, 4 steps a day. Its state
s_t = (k, day / 100, t) names the group k (env_k), the day and the step, so the test can recompute from a
stored state everything the environment produced: observations, next state, the available actions (one
action of each agent is unavailable at every step, a different one each step, and ``step`` raises on an
unavailable action, as SMAC does), the reward, and how the day ends: env_1 ends by its time limit
(truncated, so the last transition bootstraps), env_2 ends in a terminal state at its 4th step (terminated,
no bootstrap). The estimator is a small ``ReleasedEstimator`` with random weights written by the test.

Each script is run twice in this process (``conftest.run_script_in_process``), greedy (epsilon 0), with a
target network that is never copied; the loop's namespace gives its replay ``rb``, networks, estimator and last
minibatch ``b`` (a Batch: ``b.idx``), and a spy on ``clip_grad_norm_`` (called once per update, just before the
optimiser step) records the env step of every gradient step:
  run A: 5 days = 20 steps, one gradient step (at step 20);
  run B: the same command with 6 days, so its first 20 steps are run A's, and a second gradient step (at 24).
The test then checks, against its own computation from the formulas above and the networks' weights:
  * the replay holds exactly what the task produced (storage, truncation vs termination flags);
  * every action is the greedy action over the *available* actions of the agent network of that time
    (theta_0 in run A, theta_1 in run B's last day), from history windows built here;
  * theta_1 - theta_0 (run A) is one closed-form optimiser step (RMSprop / Adam first step, after the
    gradient-norm clip) on the loss built here: y = r_tilde + gamma (1 - terminated) V'(theta-),
    r_tilde = min over the estimator heads at the stored (s, a, t) (never the observed reward, except with
    --observed-reward), V' the masked greedy value of the target networks on h' (VDN: sum; QMIX: the
    target mixer on s'; QTRAN: the target Q_jt at the masked greedy joint action), QTRAN with L_opt and
    L_nopt (Q-hat detached, greedy actions at h masked);
  * theta_2 - theta_1 (run B) is the closed-form second optimiser step, with V' still from theta_0: a
    loop that bootstraps from the online network, or copies the target, fails here;
  * a run with epsilon 1 (random actions) finishes: the random actions are masked too;
  run C (VDN, QMIX, QTRAN): run B's command with a hard copy every 20 steps: the copy after the update at step 20
    puts theta_1 into every target network (the buffer's V' cache version 1) and the second step bootstraps from it;
  run D (VDN, QMIX, QTRAN): run A's command with epsilon 1 -> 0.05 over 16 steps: every generator is seeded from
    --seed, the online agents act on the day's history window, and every config, day, action and minibatch
    follows from the logged draws of the script's numpy Generator (test_loops_vdn_qmix.DrawLog), the masks and
    the epsilon schedule.
The VDN case clips at 10 (binding) and the Adam QTRAN case weights L_opt and L_nopt unequally (0.7, 1.3), so the
clip line and a swap of the two weights are seen.
"""

from __future__ import annotations

import copy
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import import_file, run_script_in_process
from test_loops_vdn_qmix import DrawLog, expected_epsilon

import envs
import runs as run_plumbing  # runs.py ("runs" is the fixture below)

N, A, OBS, STATE, DAY_LEN = 2, 3, 2, 3, 4
CONFIGS = ["env_1", "env_2"]  # env_1: truncated at the time limit; env_2: terminated at its last step
GAMMA, WINDOW, HIDDEN = 0.9, 3, 8
DAYS_A, DAYS_B = 5, 6  # run A: 20 steps, 1 update (step 20); run B: 24 steps, updates at 20 and 24
SEED = 6  # its days and minibatches: both kinds of day end in run A's batch, QTRAN's L_nopt active on part of it


# ------------------------------------------- the task ------------------------------------------


def state_of(k: int, day: int, t: int) -> np.ndarray:
    return np.array([k, day / 100.0, t], dtype=np.float32)


def obs_of(k: int, day: int, t: int) -> np.ndarray:
    return np.array([[0.3 * t + 0.5 * i, 0.2 * k + day / 100.0] for i in range(N)], dtype=np.float32)


def avail_of(t: int) -> np.ndarray:
    """Agent 0 cannot take action t mod 3, agent 1 cannot take action (t + 1) mod 3."""
    avail = np.ones((N, A), dtype=bool)
    avail[0, t % A] = avail[1, (t + 1) % A] = False
    return avail


def reward_of(k: int, t: int, actions) -> float:
    return float(-(k + 1) * (1 + actions[0]) + 0.5 * actions[1] - 0.1 * t)


def terminal(k: int, t: int) -> bool:
    """The transition at step t ends in a terminal state (env_2's last step)."""
    return k == 2 and t == DAY_LEN - 1


class MaskedTask:
    """The task of the module docstring, one per config (k = 1 for env_1, 2 for env_2)."""

    def __init__(self, config: str):
        self.k = int(config.split("_")[1])
        self.n_agents, self.n_actions, self.obs_dim, self.state_dim, self.episode_limit = N, A, OBS, STATE, DAY_LEN

    def reset(self, day: int):
        self.day, self.t = int(day), 0
        return obs_of(self.k, self.day, 0), state_of(self.k, self.day, 0), avail_of(0)

    def step(self, actions):
        actions = np.asarray(actions).reshape(N)
        if not avail_of(self.t)[np.arange(N), actions].all():
            raise ValueError(f"unavailable action {actions.tolist()} at step {self.t}")
        reward, done = reward_of(self.k, self.t, actions), terminal(self.k, self.t)
        self.t += 1
        return (
            obs_of(self.k, self.day, self.t),
            state_of(self.k, self.day, self.t),
            avail_of(self.t),
            reward,
            done,
            self.t >= self.episode_limit and not done,
            {},
        )


@pytest.fixture()
def masked_task(monkeypatch):
    monkeypatch.setattr(envs, "make_env", lambda env_id, config=None, seed=0: MaskedTask(config))


@pytest.fixture(scope="module")
def gdr():
    return import_file("groupdr_reward", "algos/groupdr_reward.py")


@pytest.fixture(scope="module")
def estimator_file(tmp_path_factory, gdr):
    """A released-architecture estimator for MaskedTask, heads env_1 and env_2, random weights and head biases
    -60 and -40: rewards of the building's scale, so the TD errors make the gradient norm exceed the clip of 10."""
    path = str(tmp_path_factory.mktemp("loops") / "estimator.pt")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        net = gdr.ReleasedEstimator(STATE, N, A, len(CONFIGS), hidden_dim=8, time_norm=float(DAY_LEN))
        with torch.no_grad():
            net.out_fc.bias.copy_(torch.tensor([-60.0, -40.0]))
    torch.save(
        {
            "format": gdr.ESTIMATOR_FORMAT,
            "configs": CONFIGS,
            "n_agents": N,
            "n_actions": A,
            "state_dim": STATE,
            "architecture": "released",
            "hidden_dim": 8,
            "time_norm": float(DAY_LEN),
            "estimator": net.state_dict(),
        },
        path,
    )
    return path


# ---------------------------------------- the scripts' runs ---------------------------------------

CASES = {  # case -> (script, extra flags, agent optimiser, (joint optimiser or None), gradient clip)
    "vdn": ("groupdr_vdn", ["--max-grad-norm", "10"], ("rmsprop", 5e-4), None, 10.0),  # clipped: the clip line runs
    "vdn_observed_reward": ("groupdr_vdn", ["--observed-reward"], ("rmsprop", 5e-4), None, 0.0),
    "qmix": ("groupdr_qmix", ["--mixing-embed-dim", "4"], ("rmsprop", 5e-4), ("rmsprop", 5e-4), 10.0),
    "qtran": ("groupdr_qtran", [], ("rmsprop", 5e-4), ("adam", 1e-3), 10.0),
    "qtran_adam": (
        "groupdr_qtran",
        ["--optimizer", "adam", "--lambda-opt", "0.7", "--lambda-nopt", "1.3"],
        ("adam", 1e-3),
        ("adam", 1e-3),
        10.0,
    ),  # unequal weights of L_opt and L_nopt: a swap of the two shows
}


def run_counting_updates(script: str, args, cwd: str) -> dict:
    """run_script_in_process, plus g["updates"]: the env step of every gradient step, read at the loop's one
    clip_grad_norm_ call per update (just before the optimiser step)."""
    updates, real_clip = [], torch.nn.utils.clip_grad_norm_

    def clip(*a, **k):
        updates.append(sys._getframe(1).f_globals["global_step"])  # the loop's env step (read only)
        return real_clip(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        g = run_script_in_process(script, args, cwd)
    g["updates"] = updates
    return g


def run(case: str, days: int, tmp, estimator_file, *extra) -> dict:
    script, flags = CASES[case][:2]
    args = [
        "--train-configs",
        ",".join(CONFIGS),
        "--train-days",
        "0:100",
        "--total-episodes",
        days,
        "--gamma",
        GAMMA,
        "--learning-starts",
        16,
        "--train-frequency",
        4,
        "--batch-size",
        12,
        "--buffer-size",
        50,
        "--window",
        WINDOW,
        "--hidden-dim",
        HIDDEN,
        "--target-network-frequency",
        10**9,
        "--start-e",
        0.0,
        "--end-e",
        0.0,
        "--seed",
        SEED,
        "--checkpoint-every",
        0,
        "--log-every",
        100,
        "--torch-threads",
        1,
        "--run-name",
        f"{case}_{days}_{len(extra)}",
        *flags,
        *extra,
    ]
    if "--observed-reward" not in flags:
        args += ["--estimator-checkpoint", estimator_file]
    return run_counting_updates(f"algos/{script}.py", args, str(tmp))


@pytest.fixture(scope="module")
def runs(estimator_file, tmp_path_factory):
    """case -> (run A, run B) namespaces, with MaskedTask in envs.make_env while they run."""
    mp, tmp, out = pytest.MonkeyPatch(), tmp_path_factory.mktemp("loop_runs"), {}
    mp.setattr(envs, "make_env", lambda env_id, config=None, seed=0: MaskedTask(config))
    try:
        for case in CASES:
            out[case] = (run(case, DAYS_A, tmp, estimator_file), run(case, DAYS_B, tmp, estimator_file))
    finally:
        mp.undo()
    return out


def decode(rb, i: int) -> tuple[int, int, int]:
    k, day, t = rb.state[i]
    return round(k), round(day * 100), round(t)


# ----------------------------------- independent computations -----------------------------------


def windows(rb, idx, window=WINDOW):
    """History windows at h (ending at t) and h' (ending at t + 1) of slots idx, built from the task's
    formulas and the stored actions of the same day (slots are in step order: no wrap, checked)."""
    obs_w, prev_w = np.zeros((window, len(idx), N, OBS), np.float32), np.zeros((window, len(idx), N), np.int64)
    nobs_w, nprev_w = np.zeros_like(obs_w), np.zeros_like(prev_w)
    for b, i in enumerate(idx):
        k, day, t = decode(rb, i)
        first = i - t  # slot of step 0 of this day
        for w in range(window):
            for out_o, out_p, tau in ((obs_w, prev_w, t - window + 1 + w), (nobs_w, nprev_w, t - window + 2 + w)):
                if tau >= 0:
                    out_o[w, b] = obs_of(k, day, tau)
                if tau >= 1:
                    out_p[w, b] = rb.actions[first + tau - 1]
    return [torch.from_numpy(x) for x in (obs_w, prev_w, nobs_w, nprev_w)]


def agent_net(mod, state_dict):
    net = mod.QNetworks(N, OBS, A, HIDDEN, use_kernel=False)
    net.load_state_dict(state_dict)
    return net


def masked(q, avail):
    return q.masked_fill(~torch.as_tensor(avail), -float("inf"))


def mixer_value(mixer, q, state):
    """QMIX's Eq. (11), written out: ELU(q |W1(s)| + b1(s)) |w2(s)| + V(s)."""
    w1 = mixer.hyper_w1(state).abs().view(-1, N, mixer.embed_dim)
    hidden = F.elu(torch.einsum("bn,bne->be", q, w1) + mixer.hyper_b1(state))
    return (hidden * mixer.hyper_w2(state).abs()).sum(-1) + mixer.hyper_v[2](F.relu(mixer.hyper_v[0](state))).squeeze(-1)


def q_jt(qtran, f_sum, actions):
    """QTRAN-base Q_jt on [ReLU(Linear(one-hot joint action)), sum of the agents' features]."""
    onehot = F.one_hot(actions, A).flatten(1).float()
    return qtran.q_out(F.relu(qtran.q_fc(torch.cat([F.relu(qtran.action_fc(onehot)), f_sum], -1)))).squeeze(-1)


def v_tot(qtran, state, f_sum):
    v = torch.cat([F.relu(qtran.v_state(state)), F.relu(qtran.v_feat(f_sum))], -1)
    return qtran.v_out(F.relu(qtran.v_fc(v))).squeeze(-1)


def expected_loss(case, g, online, joint, idx, target, target_joint):
    """The loss of one update on slots idx, from online nets (agents, joint) and frozen target nets."""
    rb = g["rb"]
    obs_w, prev_w, nobs_w, nprev_w = windows(rb, idx)
    facts = [decode(rb, i) for i in idx]
    state = torch.from_numpy(np.stack([state_of(*f) for f in facts]))
    next_state = torch.from_numpy(np.stack([state_of(k, d, t + 1) for k, d, t in facts]))
    avail = np.stack([avail_of(t) for _, _, t in facts])
    next_avail = np.stack([avail_of(t + 1) for _, _, t in facts])
    done = torch.tensor([float(terminal(k, t)) for k, _, t in facts])
    actions = torch.from_numpy(rb.actions[idx])
    reward = torch.tensor([reward_of(k, t, rb.actions[i]) for (k, _, t), i in zip(facts, idx)])
    if case == "vdn_observed_reward":
        r = reward
    else:
        with torch.no_grad():
            r = g["estimator"](state, actions, torch.tensor([t for _, _, t in facts])).min(-1).values
    qtran_case = CASES[case][0] == "groupdr_qtran"
    with torch.no_grad():
        if qtran_case:
            q_next, f_next = target(nobs_w, nprev_w, with_features=True)
            v_next = q_jt(target_joint, f_next.sum(1), masked(q_next, next_avail).argmax(-1))
        else:
            q_bar = masked(target(nobs_w, nprev_w), next_avail).max(-1).values
            v_next = q_bar.sum(-1) if joint is None else mixer_value(target_joint, q_bar, next_state)
        y = r + GAMMA * (1.0 - done) * v_next
    if qtran_case:
        q, f = online(obs_w, prev_w, with_features=True)
        f_sum, q_taken = f.sum(1), q.gather(-1, actions[..., None]).squeeze(-1)
        q_tot, v = q_jt(joint, f_sum, actions), v_tot(joint, state, f_sum)
        q_greedy = masked(q, avail).max(-1).values
        q_jt_greedy = q_jt(joint, f_sum, masked(q, avail).argmax(-1)).detach()  # Q-hat at the masked greedy a_bar
        l_opt = ((q_greedy.sum(-1) - q_jt_greedy + v) ** 2).mean()
        nopt = q_taken.sum(-1) - q_tot.detach() + v  # Eq. (13) before the clamp: active where < 0
        l_nopt = (torch.clamp(nopt, max=0.0) ** 2).mean()
        a = g["args"]
        return ((q_tot - y) ** 2).mean() + a.lambda_opt * l_opt + a.lambda_nopt * l_nopt, (r, nopt.detach())
    q_taken = online(obs_w, prev_w).gather(-1, actions[..., None]).squeeze(-1)
    q_tot = q_taken.sum(-1) if joint is None else mixer_value(joint, q_taken, state)
    return ((q_tot - y) ** 2).mean(), (r, None)


def clipped_grads(loss, modules, clip):
    params = [(f"{m}.{n}", p) for m, mod in modules.items() for n, p in mod.named_parameters()]
    for _, p in params:
        p.grad = None
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in params}
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads.values())))
    if clip > 0:
        grads = {n: g * min(1.0, clip / (norm + 1e-6)) for n, g in grads.items()}
    return grads, norm


def first_step(kind, lr, g, eps):
    """Closed-form first step: RMSprop (alpha 0.99, v_1 = 0.01 g^2) or Adam (m_hat = g, v_hat = g^2)."""
    return -lr * g / ((0.01 * g**2).sqrt() + eps) if kind == "rmsprop" else -lr * g / (g.abs() + 1e-8)


def second_step(kind, lr, g1, g2, eps):
    """Closed-form second step after first_step's state."""
    if kind == "rmsprop":
        return -lr * g2 / ((0.99 * 0.01 * g1**2 + 0.01 * g2**2).sqrt() + eps)
    m, v = 0.9 * 0.1 * g1 + 0.1 * g2, 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    return -lr * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + 1e-8)


def nets_of(case, g):
    """(online agents, online joint (mixer / QTRAN nets) or None, target agents, target joint or None)."""
    joint = {"groupdr_qmix": "mixer", "groupdr_qtran": "qtran"}.get(CASES[case][0])
    return (g["q_network"], g[joint] if joint else None, g["target_network"], g[f"target_{joint}"] if joint else None)


def step_check(case, g, start, idx, prev_grads=None):
    """The change of every online parameter of run g from `start` (state dicts of agents / joint) over its last
    update on slots idx, against first_step (prev_grads None) or second_step. -> the clipped gradients."""
    mod = import_file(f"{CASES[case][0]}_loops", f"algos/{CASES[case][0]}.py")
    _, agent_opt, joint_opt, clip = CASES[case][1:]
    online_q, online_j, target_q, target_j = nets_of(case, g)
    agents = agent_net(mod, start[0])
    joint = copy.deepcopy(online_j) if online_j is not None else None
    if joint is not None:
        joint.load_state_dict(start[1])
    target = agent_net(mod, target_q.state_dict())
    loss, info = expected_loss(case, g, agents, joint, idx, target, target_j)
    modules = {"agents": agents, **({"joint": joint} if joint is not None else {})}
    grads, norm = clipped_grads(loss, modules, clip)
    after = {f"agents.{n}": p for n, p in online_q.state_dict().items()}
    after.update({f"joint.{n}": p for n, p in (online_j.state_dict().items() if online_j is not None else [])})
    before = {f"agents.{n}": p for n, p in start[0].items()}
    before.update({f"joint.{n}": p for n, p in (start[1].items() if start[1] is not None else [])})
    eps_rms = g["args"].rmsprop_eps
    for name, grad in grads.items():
        kind, lr = agent_opt if name.startswith("agents.") else joint_opt
        eps = eps_rms if kind == "rmsprop" else 1e-8
        want = first_step(kind, lr, grad, eps) if prev_grads is None else second_step(kind, lr, prev_grads[name], grad, eps)
        torch.testing.assert_close(
            after[name] - before[name], want, rtol=1e-3, atol=1e-6, msg=lambda m, name=name: f"{case}: {name}: {m}"
        )
    return grads, (*info, norm)


def assert_widths(case, g):
    """The networks have the widths their flags give (step_check rebuilds them from the loop's own weights, so a
    network built with another flag's width would go unseen otherwise): agents --hidden-dim, the QMIX mixer
    --mixing-embed-dim, Q_jt / V_tot --hidden-dim; the target networks the online ones' shapes."""
    a, H = g["args"], g["args"].hidden_dim
    online, joint, target, target_joint = nets_of(case, g)
    want = {"drqn.fc1.weight_obs": (N, H, OBS), "drqn.lstm.weight_hh_l0": (N, 4 * H, H), "drqn.fc_out.weight": (N, A, H)}
    if CASES[case][0] == "groupdr_qmix":
        E = a.mixing_embed_dim
        want_joint = {"hyper_w1.weight": (N * E, STATE), "hyper_w2.weight": (E, STATE), "hyper_v.2.weight": (1, E)}
    elif CASES[case][0] == "groupdr_qtran":
        want_joint = {"action_fc.weight": (H, N * A), "q_fc.weight": (H, 2 * H), "v_state.weight": (H, STATE)}
    else:
        want_joint = {}
    for net, tgt, want_net in ((online, target, want), (joint, target_joint, want_joint)):
        if net is None:
            continue
        sd = net.state_dict()
        for key, shape in want_net.items():
            assert tuple(sd[key].shape) == shape, (case, key, tuple(sd[key].shape), shape)
        assert {k: v.shape for k, v in tgt.state_dict().items()} == {k: v.shape for k, v in sd.items()}


# ------------------------------------------- the tests ------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_replay_holds_what_the_task_produced(runs, case):
    """Every stored transition of run B equals the task's formulas: s, o, s', o', avail' (and avail at h for
    QTRAN), reward, the step index, and the end of the day: env_1 truncated (time limit, terminated = 0),
    env_2 terminated; both days of the grid occur. The slots are in step order (no wrap)."""
    rb = runs[case][1]["rb"]
    assert rb.size == rb.ptr == DAYS_B * DAY_LEN
    seen = set()
    for i in range(rb.size):
        k, day, t = decode(rb, i)
        seen.add(k)
        assert t == rb.t[i] == i % DAY_LEN and k in (1, 2) and decode(rb, i - t)[:2] == (k, day)
        np.testing.assert_array_equal(rb.next_state[i], state_of(k, day, t + 1))
        np.testing.assert_array_equal(rb.obs[i], obs_of(k, day, t))
        np.testing.assert_array_equal(rb.next_obs[i], obs_of(k, day, t + 1))
        np.testing.assert_array_equal(rb.next_avail[i], avail_of(t + 1))
        if hasattr(rb, "avail"):
            np.testing.assert_array_equal(rb.avail[i], avail_of(t))
        assert rb.reward[i] == pytest.approx(reward_of(k, t, rb.actions[i]), abs=1e-5)
        assert rb.terminated[i] == float(terminal(k, t)), (i, k, t)
        assert rb.truncated[i] == float(t == DAY_LEN - 1), (i, k, t)  # the last step of every day: a time limit
    assert seen == {1, 2}


@pytest.mark.parametrize("case", list(CASES))
def test_actions_are_greedy_over_available_actions(runs, case):
    """Epsilon 0: each stored action is argmax over the available actions of Q_i(h_i; theta) with the windows
    built here, theta_0 (the never-copied target) for all of run A and theta_1 (run A's result) for run B's
    last day. At least one of them differs from the unmasked argmax, so the mask is exercised."""
    mod = import_file(f"{CASES[case][0]}_loops", f"algos/{CASES[case][0]}.py")
    a, b = runs[case]
    unmasked_differs = 0
    for g, slots, weights in (
        (a, range(DAYS_A * DAY_LEN), a["target_network"].state_dict()),
        (b, range(DAYS_A * DAY_LEN, DAYS_B * DAY_LEN), a["q_network"].state_dict()),
    ):
        rb, idx = g["rb"], np.array(list(slots))
        obs_w, prev_w, _, _ = windows(rb, idx)
        with torch.no_grad():
            q = agent_net(mod, weights)(obs_w, prev_w)
        avail = np.stack([avail_of(decode(rb, i)[2]) for i in idx])
        np.testing.assert_array_equal(rb.actions[idx], masked(q, avail).argmax(-1).numpy())
        unmasked_differs += int((q.argmax(-1).numpy() != rb.actions[idx]).sum())
    assert unmasked_differs > 0


@pytest.mark.parametrize("case", list(CASES))
def test_one_update_is_one_optimiser_step_on_the_groupdr_loss(runs, case):
    """Run A's only gradient step moves every online parameter (agents, and mixer / Q_jt / V_tot) exactly by
    the closed-form first optimiser step on the loss built here (see the module docstring), after the
    gradient-norm clip. The batch has a truncated and a terminated transition, so a time limit treated as
    terminal fails; r_tilde is the estimator's per-sample min (the observed reward with --observed-reward),
    and it differs from the observed reward. The gradient norm exceeds the clip (QMIX, QTRAN), and QTRAN's
    L_nopt is active on part of the batch (so its clamp and the detached Q_jt matter)."""
    a = runs[case][0]
    assert a["updates"] == [DAYS_A * DAY_LEN]
    assert_widths(case, a)
    idx = a["b"].idx
    ends = [(decode(a["rb"], i)[0], decode(a["rb"], i)[2]) for i in idx]
    assert (2, DAY_LEN - 1) in ends and (1, DAY_LEN - 1) in ends, ends  # a terminal and a time-limit transition
    _, _, target_q, target_j = nets_of(case, a)
    start = (target_q.state_dict(), target_j.state_dict() if target_j is not None else None)  # theta_0 = theta-
    _, (r, nopt, norm) = step_check(case, a, start, idx)
    observed = torch.from_numpy(a["rb"].reward[idx])
    if case != "vdn_observed_reward":
        assert (r - observed).abs().max() > 1.0  # the target really uses r_tilde, not r
    if CASES[case][4] > 0:
        assert norm > CASES[case][4], norm  # the clip is active
    if nopt is not None:
        assert (nopt < 0).any() and (nopt > 0).any(), nopt  # L_nopt's clamp and its detach both matter


@pytest.mark.parametrize("case", list(CASES))
def test_second_update_bootstraps_from_the_frozen_target(runs, case):
    """Run B repeats run A (same first 20 steps, same first update: its target networks equal run A's, i.e.
    theta_0) and takes a second step at step 24 from theta_1 = run A's result. That step is the closed-form
    second optimiser step of the loss whose V' still comes from theta_0 (never copied): a loop that
    bootstraps from the online network, or copies theta- <- theta, fails."""
    a, b = runs[case]
    assert b["updates"] == [DAYS_A * DAY_LEN, DAYS_B * DAY_LEN]
    _, _, ta, tja = nets_of(case, a)
    _, _, tb, tjb = nets_of(case, b)
    for x, y in [(ta, tb)] + ([(tja, tjb)] if tja is not None else []):
        for key, value in x.state_dict().items():
            assert torch.equal(value, y.state_dict()[key]), key
    start0 = (ta.state_dict(), tja.state_dict() if tja is not None else None)
    g1, _ = step_check(case, a, start0, a["b"].idx)
    qa, ja, _, _ = nets_of(case, a)
    start1 = (qa.state_dict(), ja.state_dict() if ja is not None else None)
    step_check(case, b, start1, b["b"].idx, prev_grads=g1)


@pytest.mark.parametrize("script", ["groupdr_vdn", "groupdr_qmix", "groupdr_qtran"])
def test_random_actions_are_masked(masked_task, estimator_file, tmp_path, script):
    """Epsilon 1 (uniform random actions): MaskedTask raises on an unavailable action, so the run only
    finishes if the random actions are drawn among the available ones; every stored action is available."""
    g = run_script_in_process(
        f"algos/{script}.py",
        [
            "--train-configs",
            ",".join(CONFIGS),
            "--estimator-checkpoint",
            estimator_file,
            "--total-episodes",
            4,
            "--learning-starts",
            8,
            "--batch-size",
            4,
            "--buffer-size",
            50,
            "--window",
            WINDOW,
            "--hidden-dim",
            HIDDEN,
            "--start-e",
            1.0,
            "--end-e",
            1.0,
            "--checkpoint-every",
            0,
            "--torch-threads",
            1,
            "--run-name",
            "random",
        ],
        str(tmp_path),
    )
    rb = g["rb"]
    for i in range(rb.size):
        assert avail_of(int(rb.t[i]))[np.arange(N), rb.actions[i]].all()
    assert len({tuple(a) for a in rb.actions[: rb.size]}) > 2  # random: several joint actions


# ------------------------------- a copied target, epsilon-greedy acting -------------------------------

EXPLORE = ["--start-e", "1.0", "--end-e", "0.05", "--exploration-steps", "16"]  # epsilon 1 -> 0.05 over run A's 20 steps
SCRIPT_CASES = ["vdn", "qmix", "qtran"]


def recorded_run(case: str, days: int, tmp, estimator_file, *extra) -> tuple[dict, dict]:
    """run() with taps that only read: every q_network.greedy_q call (the acting windows and Q-values, and the loop's
    epsilon then; acting is its only use), every draw of the script's numpy Generator (DrawLog), its seed, the torch / python / numpy global
    generators when the first task is made, and the (config, day) of every reset."""
    rec = {"acting": [], "draws": [], "resets": [], "rng_seed": "not made", "seeds": None}
    real_default_rng = np.random.default_rng

    class ActingRun(run_plumbing.Run):  # the scripts look runs.Run up when they start a run
        def track(self, **state):  # the scripts call it more than once
            if "q_network" not in state:
                return super().track(**state)
            greedy_q = state["q_network"].greedy_q

            def acting(obs_w, prev_w, *a, **k):
                out = greedy_q(obs_w, prev_w, *a, **k)
                epsilon = sys._getframe(1).f_globals.get("epsilon")  # the loop's epsilon of this step (read only)
                rec["acting"].append((obs_w.clone(), prev_w.clone(), out.clone(), epsilon))
                return out

            state["q_network"].greedy_q = acting
            super().track(**state)

    class LoggedTask(MaskedTask):
        def reset(self, day: int):
            rec["resets"].append((self.k, int(day)))
            return super().reset(day)

    def make_env(env_id, config=None, seed=0):
        if rec["seeds"] is None:
            rec["seeds"] = (torch.initial_seed(), random.getstate(), np.random.get_state())
        return LoggedTask(config)

    def default_rng(seed=None):
        if sys._getframe(1).f_globals.get("__name__") != "__main__":
            return real_default_rng(seed)
        rec["rng_seed"] = seed
        return DrawLog(seed, rec["draws"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_plumbing, "Run", ActingRun)
        mp.setattr(envs, "make_env", make_env)
        mp.setattr(np.random, "default_rng", default_rng)
        g = run(case, days, tmp, estimator_file, *extra)
    return g, rec


@pytest.fixture(scope="module")
def copy_and_explore_runs(estimator_file, tmp_path_factory):
    """case -> (run C: run B's command with --target-network-frequency 20, a copy right after the update at step 20;
    run D: run A's command with epsilon-greedy acting (EXPLORE), recorded)."""
    tmp = tmp_path_factory.mktemp("copy_explore")
    out = {}
    for case in SCRIPT_CASES:
        c, _ = recorded_run(case, DAYS_B, tmp, estimator_file, "--target-network-frequency", "20")
        d = recorded_run(case, DAYS_A, tmp, estimator_file, *EXPLORE)
        out[case] = (c, d)
    return out


@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_hard_copy_after_the_first_update_bootstraps_the_second_from_it(runs, copy_and_explore_runs, case):
    """Run C = run B with a hard copy every 20 env steps: its first 20 steps and update are run A's, then theta- <-
    theta copies theta_1 (agents and mixer / Q_jt, V_tot: one copy, target version 1), so the second update (step
    24) is the closed-form second optimiser step whose V' comes from theta_1, not from theta_0 (run B's)."""
    a, b = runs[case]
    c = copy_and_explore_runs[case][0]
    assert c["updates"] == [DAYS_A * DAY_LEN, DAYS_B * DAY_LEN] and c["rb"].version == 1
    qa, ja, ta, tja = nets_of(case, a)
    qc, _, tc, tjc = nets_of(case, c)
    for online, target in [(qa, tc)] + ([(ja, tjc)] if ja is not None else []):  # theta- = theta_1, every tensor
        for key, value in online.state_dict().items():
            assert torch.equal(value, target.state_dict()[key]), key
    assert any(not torch.equal(v, ta.state_dict()[k]) for k, v in tc.state_dict().items())  # theta_1 != theta_0
    np.testing.assert_array_equal(c["rb"].actions[: DAYS_A * DAY_LEN], a["rb"].actions[: DAYS_A * DAY_LEN])
    g1, _ = step_check(case, a, (ta.state_dict(), tja.state_dict() if tja is not None else None), a["b"].idx)
    step_check(case, c, (qa.state_dict(), ja.state_dict() if ja is not None else None), c["b"].idx, prev_grads=g1)
    assert any(not torch.equal(v, b["q_network"].state_dict()[k]) for k, v in qc.state_dict().items())  # not run B's


@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_acting_follows_the_history_the_epsilon_schedule_and_the_seeded_draws(copy_and_explore_runs, case):
    """Run D (20 steps, epsilon 1 -> 0.05 over 16 steps, the only update at step 20, so every action comes from
    theta_0 = the never-copied target). (a) Seeding: torch's initial seed, the python and numpy global generators
    and the numpy Generator all come from --seed. (b) The online agents act (one q_network.greedy_q call per env
    step) on the window of the day's last W observations and previous actions, built here from the task's formulas,
    with theta_0's Q-values. (c) The Generator's draws come in the loop's order: at each episode start a training
    config uniform over --train-configs (the group the task was reset in) and a day uniform on --train-days (the
    day it was reset to); at each step an (N, A) uniform draw whose argmax over the available actions is the random
    action and one coin per agent; at the update, --batch-size indices on [0, size) (the update's idx). (d) An
    agent's action is the random one where its coin < epsilon(step), else the masked argmax of theta_0's Q; the
    loop's epsilon at each step (read at its acting call) is the linear schedule's value at that env step."""
    mod = import_file(f"{CASES[case][0]}_loops", f"algos/{CASES[case][0]}.py")
    g, rec = copy_and_explore_runs[case][1]
    a, rb = g["args"], g["rb"]
    torch_seed, py_state, np_state = rec["seeds"]
    ref = np.random.RandomState(a.seed).get_state()
    assert torch_seed == a.seed == rec["rng_seed"] and py_state == random.Random(a.seed).getstate()
    assert np_state[0] == ref[0] and np.array_equal(np_state[1], ref[1]) and np_state[2:] == ref[2:]
    n = DAYS_A * DAY_LEN
    assert rb.size == n and g["updates"] == [n] and len(rec["acting"]) == n
    obs_w, prev_w, _, _ = windows(rb, np.arange(n))
    with torch.no_grad():
        q_all = agent_net(mod, g["target_network"].state_dict())(obs_w, prev_w)  # theta_0
    lo, hi = (int(x) for x in a.train_days.split(":"))
    draws = iter(rec["draws"])

    def draw(kind, shape, bounds=None):
        got = next(draws, None)
        assert got is not None and got[0] == kind and got[2].shape == shape, (kind, shape, got)
        assert bounds is None or tuple(got[1]) == bounds, (kind, got[1], bounds)
        return got[2]

    n_random = 0
    for j in range(n):
        k, day, t = decode(rb, j)
        if t == 0:
            config = CONFIGS[int(draw("integers", (), (len(CONFIGS), None)))]
            assert (
                int(draw("integers", (), (lo, hi))) == day and config == f"env_{k}" and rec["resets"][j // DAY_LEN] == (k, day)
            )
        acted_obs, acted_prev, q_acted, epsilon = rec["acting"][j]
        assert epsilon == pytest.approx(expected_epsilon(a, j), rel=1e-9, abs=1e-12), (j, epsilon)
        assert torch.equal(acted_obs[:, 0], obs_w[:, j]) and torch.equal(acted_prev[:, 0], prev_w[:, j]), j
        torch.testing.assert_close(q_acted[0], q_all[j], rtol=1e-5, atol=1e-5)
        uniform = draw("random", (N, A))
        coins = draw("random", (1,) if a.single_coin else (N,))
        coins = np.broadcast_to(coins, (N,))
        explore = coins < epsilon
        want = np.where(explore, np.argmax(uniform * avail_of(t), axis=1), masked(q_all[j], avail_of(t)).argmax(-1).numpy())
        np.testing.assert_array_equal(rb.actions[j], want, err_msg=f"step {j} (exploring: {explore})")
        n_random += int(explore.sum())
    np.testing.assert_array_equal(draw("integers", (a.batch_size,), (0, n)), g["b"].idx)
    assert next(draws, None) is None  # nothing else drawn
    assert 5 <= n_random <= 2 * n - 5, n_random  # both branches of epsilon-greedy occur
