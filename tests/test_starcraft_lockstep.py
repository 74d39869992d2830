"""Lockstep StarCraft evaluation (issue 18, item 2): the 2 x 32 test episodes of a round run as one batch
and give the very numbers of the sequential loop.

* envs.SMAXTask.reset_batch / step_batch (SMAX stepped as vmapped chunks, finished rows masked) equal
  reset(day) / step() row by row, bit for bit, on episodes that are won, lost and run with random actions,
  across two chunks (the second padded); a batch leaves a training episode in progress untouched;
* eval.run_episodes_lockstep equals eval.run_episode episode by episode (return and battle won), clean and
  noisy, for a scripted kiting policy that wins (the battle_won / return / noise bookkeeping of the loop) and
  for untrained DRQNs, per-agent (one call for all live episodes, eval.lockstep_q) and shared;
* eval.evaluate_starcraft gives the same dict either way, takes the lockstep path for SMAX by default and
  keeps a task without reset_batch (SMAC, one game process) on the sequential loop.

The reference is always the sequential code path itself (run_episode, step()), never stored numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs

pytest.importorskip("jaxmarl")

DIRS = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]], dtype=np.float32)  # SMAX actions 0-3: N, E, S, W
FIRST = 10**9  # evaluation episode ids, as eval.EVAL_FIRST_DAY


@pytest.fixture(scope="module")
def smax():
    return envs.make_env("smax", "3s_vs_5z", seed=1)


def kite_scores(task, obs, safe=0.5, centre_weight=3.0):
    """Scripted kiting as Q-values (N, A) of one episode, so that masked_argmax picks its action: shoot the
    weakest enemy in range when the weapon is ready, back away from a close zealot, walk east while no enemy
    is seen, else stop. Dead agents have only the stop action available."""
    q = np.full((task.n_agents, task.n_actions), -5.0, dtype=np.float32)
    for i in range(task.n_agents):
        own = obs[i, -10:]  # health, x / 32, y / 32, cooldown fraction, unit-type bits
        rel = obs[i, task.enemy_position_indices]
        seen = np.abs(obs[i, task.enemy_feature_indices]).sum(-1) > 0
        dist = np.where(seen, np.linalg.norm(rel, axis=1), np.inf)
        q[i, task.noop_action] = 0.0
        if own[3] <= 0.0:
            q[i, 5:] = 10.0 - obs[i, task.enemy_feature_indices[:, 0]]  # unavailable (out of range) ones are masked
        if seen.any() and dist.min() < safe:
            away = -rel[np.argmin(dist)] / (dist.min() + 1e-8)
            q[i, :4] = 5.0 + np.tanh(DIRS @ away + centre_weight * (DIRS @ (0.5 - own[1:3])))
        elif not seen.any():
            q[i, 1] = 5.0
    return q


class KiteNetwork:
    """A stand-in q_network for eval's loops: greedy_q(obs_w (W, B, N, O), prev) -> kite_scores of the last
    observation of each window (no DRQN: lockstep_q calls it episode by episode)."""

    def __init__(self, task):
        self.task = task

    def greedy_q(self, obs_w, prev_a_w):
        return torch.from_numpy(np.stack([kite_scores(self.task, o) for o in obs_w[-1].numpy()]))


class Outcomes:
    """The task, recording how each episode ended ((terminated, truncated, won) of its last step)."""

    def __init__(self, task):
        self.task, self.ends = task, []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def step(self, actions):
        out = self.task.step(actions)
        if out[4] or out[5]:
            self.ends.append((out[4], out[5], out[6]["battle_won"]))
        return out


def untrained_drqn(vdn, task, share_params: bool):
    """An untrained DRQN with weights x3 and biases that walk east (action 1) and attack (5+j): episodes that
    fight, with returns that differ between episodes and between clean and noisy observations."""
    torch.manual_seed(0)
    net = vdn.QNetworks(task.n_agents, task.obs_dim, task.n_actions, 64, share_params)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
        net.drqn.fc_out.bias[..., 1] += 2.0
        net.drqn.fc_out.bias[..., 5:] += 4.0
    return net.eval()


def test_step_batch_equals_step_row_by_row(smax):
    """chunk + 4 episodes (10 days, repeated; 2 chunks of envs.smax_batch_chunk(8) = 16, the second padded): rows
    0-9 kite, rows 10-14 kite without shooting, the others take seeded random available actions. Each row's
    episode is first played alone with reset(day) / step(), its actions recorded; the batch, fed the same actions, must return the same obs, state, avail, reward,
    terminated, truncated and battle_won at every step of every live row, bit for bit. The rows' episodes end won,
    lost and at the time limit, so every outcome flag is exercised. A training episode in progress (reset before the
    batch) continues after it exactly as without it."""
    chunk = envs.smax_batch_chunk(smax.n_agents + smax.n_enemies)
    B = chunk + 4  # two chunks, the second one padded
    days = [FIRST + k % 10 for k in range(B)]

    def policy(e, rng, obs, avail):
        q = kite_scores(smax, obs)
        if 10 <= e < 15:
            q[:, 5:] = -100.0  # kite without shooting: survives to the time limit on some days
        if e >= 15:
            q = rng.random(avail.shape)
        return np.where(avail, q, -np.inf).argmax(1)

    # a training episode in progress (its state kept aside while the rows are played alone), and its continuation
    smax.reset(7)
    first = [smax.step([1, 1, 1])[0] for _ in range(3)]
    smax.reset(7)
    smax.step([1, 1, 1])
    training = (smax._env_state, smax._key, smax._avail, smax._done)

    ref = []  # per row: [(obs, state, avail), (actions, step outputs), ...]
    for e, day in enumerate(days):
        rng = np.random.default_rng(e)
        obs, state, avail = smax.reset(day)
        rows = [(obs, state, avail)]
        for _ in range(smax.episode_limit):
            actions = policy(e, rng, obs, avail)
            obs, state, avail, reward, terminated, truncated, info = smax.step(actions)
            rows.append((actions, (obs, state, avail, reward, terminated, truncated, info["battle_won"])))
            if terminated or truncated:
                break
        ref.append(rows)
    smax._env_state, smax._key, smax._avail, smax._done = training

    obs, state, avail = smax.reset_batch(days)
    for e in range(B):
        for got, want in zip((obs[e], state[e], avail[e]), ref[e][0]):
            assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="cannot perform"):
        smax.step_batch(np.tile([[5, 4, 4]], (B, 1)), np.ones(B, dtype=bool))  # attack out of range at the start
    live = np.ones(B, dtype=bool)
    for t in range(1, smax.episode_limit + 1):
        actions = np.full((B, smax.n_agents), -1)  # rows not live: ignored
        for e in np.flatnonzero(live):
            actions[e] = ref[e][t][0]
        out, idle = smax.step_batch(actions, live), ~live
        for e in np.flatnonzero(live):
            want = ref[e][t][1]
            for k, (got_k, want_k) in enumerate(zip([o[e] for o in out], want)):
                assert np.array_equal(got_k, want_k), (e, t, k)
            if want[4] or want[5]:
                live[e] = False
        assert not out[3][idle].any() and not out[4][idle].any() and not out[5][idle].any() and not out[6][idle].any()
        if not live.any():
            break
    assert not live.any()
    with pytest.raises(RuntimeError, match="over"):
        smax.step_batch(np.full((B, 3), 4), np.ones(B, dtype=bool))
    outcomes = {rows[-1][1][4:7] for rows in ref}  # (terminated, truncated, won) at each episode's end
    assert outcomes == {(True, False, True), (True, False, False), (False, True, False)}  # won, lost, timed out

    # the training episode: its next steps equal the undisturbed ones
    assert all(np.array_equal(smax.step([1, 1, 1])[0], want) for want in first[1:])


def test_lockstep_episodes_equal_sequential_kiting(smax, vdn, eval_mod):
    """The kiting stand-in network on 8 days, clean and noisy (sigma 0.75): run_episodes_lockstep returns, for
    every episode, the return and battle_won of run_episode on the clean task / on ObservationNoise(task) (the
    sequential loop). Kiting wins some episodes and loses others; the noise changes at least one return."""
    net, n = KiteNetwork(smax), 8
    days = [FIRST + k for k in range(n)]
    clean = Outcomes(smax)
    noisy = envs.ObservationNoise(clean, sigma=0.75, seed=3)
    want = [eval_mod.run_episode(vdn, net, clean, d, 8) for d in days] + [
        eval_mod.run_episode(vdn, net, noisy, d, 8) for d in days
    ]
    wraps = [None] * n + [envs.ObservationNoise(smax, sigma=0.75, seed=3) for _ in days]
    returns, won = eval_mod.run_episodes_lockstep(vdn, net, smax, days + days, wraps, 8)
    assert returns.tolist() == [r for r, _ in want] and won.tolist() == [w for _, w in want]
    assert set(clean.ends) >= {(True, False, True), (True, False, False)}, clean.ends  # won and lost
    assert returns[:n].tolist() != returns[n:].tolist()


@pytest.mark.parametrize("share_params", [False, True])
def test_lockstep_evaluation_equals_sequential_drqn(smax, vdn, eval_mod, share_params):
    """An untrained DRQN (per-agent networks: lockstep_q's one call for all live episodes; shared: episode by
    episode), 6 episodes clean + 6 noisy: the per-episode returns and wins of run_episodes_lockstep equal
    run_episode's, and evaluate_starcraft's dict (win rates, mean returns) is the same with lockstep=True and
    lockstep=False. The returns are not all equal (the episodes differ) and not all zero."""
    net = untrained_drqn(vdn, smax, share_params)
    days = [FIRST + k for k in range(6)]
    noisy = envs.ObservationNoise(smax, sigma=0.75, seed=1)
    want = [eval_mod.run_episode(vdn, net, smax, d, 8) for d in days] + [
        eval_mod.run_episode(vdn, net, noisy, d, 8) for d in days
    ]
    wraps = [None] * 6 + [envs.ObservationNoise(smax, sigma=0.75, seed=1) for _ in days]
    returns, won = eval_mod.run_episodes_lockstep(vdn, net, smax, days + days, wraps, 8)
    assert returns.tolist() == [r for r, _ in want] and won.tolist() == [w for _, w in want]
    assert len(set(returns.tolist())) > 2 and returns.max() > 0
    seq = eval_mod.evaluate_starcraft(vdn, net, smax, 6, 0.75, 1, 8, lockstep=False)
    assert eval_mod.evaluate_starcraft(vdn, net, smax, 6, 0.75, 1, 8, lockstep=True) == seq
    assert seq["return_clean"] == float(np.mean(returns[:6])) and seq["return_noisy"] == float(np.mean(returns[6:]))


def test_lockstep_q_one_call_equals_calls_per_episode(smax, vdn, eval_mod):
    """lockstep_q on 7 episodes' windows (random inputs): Q equal bit for bit to 7 greedy_q calls on one episode
    each, also for the first 3 episodes only (the live subset after others ended); the plain batched call is
    shown to differ, which is why the network is repeated (if it stops differing, this test still passes)."""
    net = untrained_drqn(vdn, smax, False)
    g = torch.Generator().manual_seed(5)
    obs = torch.randn(8, 7, smax.n_agents, smax.obs_dim, generator=g)
    prev = torch.randint(0, smax.n_actions, (8, 7, smax.n_agents), generator=g)
    one = torch.cat([net.greedy_q(obs[:, e : e + 1].contiguous(), prev[:, e : e + 1].contiguous()) for e in range(7)])
    q = eval_mod.lockstep_q(net, 7)
    assert torch.equal(q(obs, prev), one)
    assert torch.equal(q(obs[:, :3].contiguous(), prev[:, :3].contiguous()), one[:3])
    rng_before = torch.get_rng_state()
    eval_mod.lockstep_q(net, 7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no RNG drawn: training's torch RNG state unchanged


def test_default_path_lockstep_for_smax_sequential_without_batch(smax, vdn, eval_mod, monkeypatch):
    """evaluate_starcraft with lockstep left at None: SMAX runs run_episodes_lockstep (run_episode never called);
    a task without reset_batch (as SMACTask, one game process; here SMAX behind a plain wrapper) runs run_episode
    for each of the 2 x n episodes."""
    calls = {"lockstep": 0, "sequential": 0}
    lock, seq = eval_mod.run_episodes_lockstep, eval_mod.run_episode

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(eval_mod, "run_episodes_lockstep", count("lockstep", lock))
    monkeypatch.setattr(eval_mod, "run_episode", count("sequential", seq))
    net = untrained_drqn(vdn, smax, False)
    eval_mod.evaluate_starcraft(vdn, net, smax, 2, 0.75, 1, 8)
    assert calls == {"lockstep": 1, "sequential": 0}

    class OneGameTask:  # the interface SMACTask offers: reset / step, no batch
        def __init__(self, task):
            self.task = task

        def __getattr__(self, name):
            if name in ("reset_batch", "step_batch"):
                raise AttributeError(name)
            return getattr(self.task, name)

    eval_mod.evaluate_starcraft(vdn, net, OneGameTask(smax), 2, 0.75, 1, 8)
    assert calls == {"lockstep": 1, "sequential": 4}
