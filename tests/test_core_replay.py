"""ReplayBuffer windows of algos/robust_vdn_rho.py against a ground truth kept by the test.

Ground truth for a transition at step t of an episode (window W):
  current window positions tau = t-W+1 .. t:  obs_tau (zero if tau < 0), prev action a_{tau-1}
  (index 0 if tau < 1);  next window positions tau = t-W+2 .. t+1, with obs_{t+1} = next_obs_t.
"""

import numpy as np
import pytest
import torch
from conftest import run_script_in_process

import envs

N, OBS, STATE, A = 6, 5, 10, 200
SCRIPT = "algos/robust_vdn_rho.py"  # run as __main__ in this process by the tests of the training loop


def make_rb(vdn, capacity, window):
    return vdn.ReplayBuffer(capacity, N, OBS, STATE, A, window)


class Truth:
    """Every transition ever added, by global id, with the episode it belongs to."""

    def __init__(self):
        self.items = []  # dict(ep, t, obs, action, next_obs)

    def add_synthetic(self, rb, ep, length):
        for t in range(length):
            g = len(self.items)
            obs = (1000.0 * (g + 1) + 10.0 * np.arange(N)[:, None] + np.arange(OBS)[None, :]).astype(np.float32)
            next_obs = obs + 0.5
            action = 1 + (7 * g + np.arange(N)) % (A - 1)  # never 0: padding is recognisable
            last = t == length - 1
            rb.add(
                obs,
                np.full(STATE, g, np.float32),
                action,
                -float(g),
                next_obs,
                np.full(STATE, g + 0.5, np.float32),
                np.ones((N, A), bool),
                0.0,
                float(last),
                t,
            )
            self.items.append({"ep": ep, "t": t, "obs": obs, "action": action, "next_obs": next_obs})

    def windows(self, g, W):
        it = self.items[g]
        ep_items = [x for x in self.items if x["ep"] == it["ep"]]
        t = it["t"]
        obs_seq = [x["obs"] for x in ep_items[: t + 1]] + [it["next_obs"]]  # obs_0 .. obs_{t+1}
        act_seq = [x["action"] for x in ep_items[: t + 1]]  # a_0 .. a_t

        def win(end):
            o = np.stack([obs_seq[tau] if tau >= 0 else np.zeros((N, OBS), np.float32) for tau in range(end - W + 1, end + 1)])
            p = np.stack([act_seq[tau - 1] if tau >= 1 else np.zeros(N, np.int64) for tau in range(end - W + 1, end + 1)])
            return o, p

        return (*win(t), *win(t + 1))


def check_slot(rb, slot, truth, g, W):
    got = rb.windows(np.array([slot]))
    exp = truth.windows(g, W)
    for name, x, y in zip(("obs_w", "prev_w", "next_obs_w", "next_prev_w"), got, exp):
        assert x.shape[1] == 1
        np.testing.assert_array_equal(x[:, 0], y, err_msg=f"{name} of slot {slot} (transition {g})")


def test_front_padding_and_first_previous_action(vdn):
    W = 8
    rb, truth = make_rb(vdn, 50, W), Truth()
    truth.add_synthetic(rb, 0, 12)
    obs_w, prev_w, _next_obs_w, _next_prev_w = rb.windows(np.arange(12))
    assert obs_w.shape == (W, 12, N, OBS) and prev_w.shape == (W, 12, N)
    for t in range(W - 1):  # t = 0..6: the first W-1-t positions are padding
        pad = W - 1 - t
        assert (obs_w[:pad, t] == 0).all() and (prev_w[:pad, t] == 0).all()
        np.testing.assert_array_equal(obs_w[pad:, t], np.stack([truth.items[k]["obs"] for k in range(t + 1)]))
        assert (obs_w[pad:, t] != 0).all()
        # first real position: previous action index 0 (t = 0 of the episode)
        assert (prev_w[pad, t] == 0).all()
        if t > 0:
            np.testing.assert_array_equal(prev_w[pad + 1 :, t], np.stack([truth.items[k]["action"] for k in range(t)]))
    assert (prev_w[-1, 0] == 0).all()  # t = 0: previous action is 0
    assert (obs_w[:, 7] != 0).all() and (prev_w[1:, 7] != 0).all() and (prev_w[0, 7] == 0).all()  # t = 7
    assert (prev_w[:, 8] != 0).all()  # t = 8: no padding at all
    for g in range(12):
        check_slot(rb, g, truth, g, W)


def test_next_window_is_shifted_current_window(vdn):
    W = 8
    rb, truth = make_rb(vdn, 60, W), Truth()
    truth.add_synthetic(rb, 0, 15)
    truth.add_synthetic(rb, 1, 10)
    idx = np.arange(25)
    obs_w, prev_w, next_obs_w, next_prev_w = rb.windows(idx)
    np.testing.assert_array_equal(next_obs_w[:-1], obs_w[1:])
    np.testing.assert_array_equal(next_prev_w[:-1], prev_w[1:])
    np.testing.assert_array_equal(next_obs_w[-1], rb.next_obs[idx])
    np.testing.assert_array_equal(next_prev_w[-1], rb.actions[idx])
    # within an episode the next window of t is the current window of t+1
    for g in list(range(14)) + list(range(15, 24)):
        np.testing.assert_array_equal(next_prev_w[:, g], prev_w[:, g + 1])
    # ... but not across episodes: episode 1 starts with padding
    assert (obs_w[:-1, 15] == 0).all() and (prev_w[:, 15] == 0).all()
    for g in range(25):
        check_slot(rb, g, truth, g, W)


def real_rollout(vdn, rb, history_log, days, steps, seed=0, W=8):
    """Act through real episodes as the training loop does (History for acting, rb.add for storage);
    log the History window before acting at every t and after pushing the next observation."""
    env = envs.make_env("building", "env_1")
    rng = np.random.default_rng(seed)
    history = envs.History(1, W, env.n_agents, env.obs_dim)
    for day in days:
        obs, state, _avail = env.reset(day)
        history.reset(obs[None])
        for t in range(steps):
            before = (history.obs[:, 0].copy(), history.prev_a[:, 0].copy())
            actions = rng.integers(0, A, N)
            next_obs, next_state, next_avail, reward, terminated, truncated, _ = env.step(actions)
            truncated = truncated or t == steps - 1
            rb.add(obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t)
            history.push(next_obs[None], actions[None])
            after = (history.obs[:, 0].copy(), history.prev_a[:, 0].copy())
            history_log.append((before, after, actions, next_obs, reward, truncated))
            obs, state, _avail = next_obs, next_state, next_avail
            if terminated or truncated:
                break


def test_windows_equal_history_through_real_episodes(vdn):
    W = 8
    rb, log = make_rb(vdn, 100, W), []
    real_rollout(vdn, rb, log, days=[3, 150], steps=13, W=W)
    assert rb.size == 26
    for slot, (before, after, *_rest) in enumerate(log):
        obs_w, prev_w, next_obs_w, next_prev_w = rb.windows(np.array([slot]))
        np.testing.assert_array_equal(obs_w[:, 0], before[0], err_msg=f"obs window, slot {slot}")
        np.testing.assert_array_equal(prev_w[:, 0], before[1], err_msg=f"prev-action window, slot {slot}")
        np.testing.assert_array_equal(next_obs_w[:, 0], after[0], err_msg=f"next obs window, slot {slot}")
        np.testing.assert_array_equal(next_prev_w[:, 0], after[1], err_msg=f"next prev-action window, slot {slot}")
    # History itself pads as the paper says: zero obs and previous action 0 at t = 0
    first = log[0][0]
    assert (first[0][:-1] == 0).all() and (first[1] == 0).all() and (first[0][-1] != 0).any()


def test_training_loop_stores_every_transition_of_a_full_day(tmp_path):
    """The script's own loop (robust_vdn_rho.py as __main__, one 288-step day, no updates): its replay
    buffer must hold exactly the day it played, last transition included. Checked against a second env
    stepped here with the stored actions (the env is deterministic given the day and the actions): every
    o, s, r, o', s', avail', t and the flags; the env itself ends the day (truncated) at t = 287 and that
    transition is stored with truncated = 1, terminated = 0 (the released code dropped it)."""
    g = run_script_in_process(
        SCRIPT,
        [
            "--total-episodes",
            1,
            "--train-days",
            "77:78",
            "--learning-starts",
            100_000,
            "--buffer-size",
            300,
            "--torch-threads",
            1,
            "--run-name",
            "day",
        ],
        str(tmp_path),
    )
    rb = g["rb"]
    assert g["global_step"] == 288 and rb.size == 288
    env = envs.make_env("building", "env_1")
    obs, state, avail = env.reset(77)
    for t in range(288):
        assert rb.t[t] == t
        np.testing.assert_array_equal(rb.obs[t], obs, err_msg=f"obs, t={t}")
        np.testing.assert_array_equal(rb.state[t], state, err_msg=f"state, t={t}")
        obs, state, avail, reward, terminated, truncated, _ = env.step(rb.actions[t])
        np.testing.assert_array_equal(rb.next_obs[t], obs, err_msg=f"next obs, t={t}")
        np.testing.assert_array_equal(rb.next_state[t], state, err_msg=f"next state, t={t}")
        np.testing.assert_array_equal(rb.next_avail[t], avail, err_msg=f"next avail, t={t}")
        assert rb.reward[t] == np.float32(reward), t
        assert (rb.terminated[t], rb.truncated[t]) == (float(terminated), float(truncated)), t
        if t < 287:
            assert not (terminated or truncated), t
    assert truncated and not terminated  # the day's time limit, reported by the env at t = 287
    assert rb.truncated[287] == 1.0 and rb.terminated[287] == 0.0
    assert len(set(map(tuple, rb.actions[:288].tolist()))) > 1  # the actions vary: a real replay


def slot_owner(n_added, capacity):
    """slot -> global id of the transition it holds now."""
    return {g % capacity: g for g in range(max(0, n_added - capacity), n_added)}


def window_intact(truth, g, n_added, capacity, W):
    """True when every transition the current and next windows of g read is still stored: the
    window positions back to max(0, t-W+1) and the previous action before the first of them."""
    t = truth.items[g]["t"]
    first_needed = g - min(t, W)  # obs from t-W+1, previous action from t-W (if those exist)
    return first_needed >= n_added - capacity


@pytest.mark.parametrize("W,capacity", [(4, 23), (8, 37), (3, 10)])
def test_sample_after_wrap_never_reads_overwritten_data(vdn, W, capacity):
    rb, truth = make_rb(vdn, capacity, W), Truth()
    rng = np.random.default_rng(W)
    lengths = [5, 12, 3, 17, 9, 20, 6, 11, 14, 8]
    n_added = 0
    for ep, length in enumerate(lengths):
        for _ in range(length):
            # add one transition at a time and sample after each
            t = sum(1 for x in truth.items if x["ep"] == ep)
            g = len(truth.items)
            obs = (1000.0 * (g + 1) + 10.0 * np.arange(N)[:, None] + np.arange(OBS)[None, :]).astype(np.float32)
            action = 1 + (7 * g + np.arange(N)) % (A - 1)
            rb.add(
                obs,
                np.zeros(STATE, np.float32),
                action,
                0.0,
                obs + 0.5,
                np.zeros(STATE, np.float32),
                np.ones((N, A), bool),
                0.0,
                float(t == length - 1),
                t,
            )
            truth.items.append({"ep": ep, "t": t, "obs": obs, "action": action, "next_obs": obs + 0.5})
            n_added += 1
            owner = slot_owner(n_added, capacity)
            idx = rb.sample_slots(400, rng)
            assert ((0 <= idx) & (idx < capacity)).all()
            assert set(idx.tolist()) <= set(owner)  # only filled slots
            for slot in np.unique(idx):
                g_slot = owner[int(slot)]
                assert window_intact(truth, g_slot, n_added, capacity, W), (
                    f"sampled slot {slot} (transition {g_slot}, t={truth.items[g_slot]['t']}) whose window lost data "
                    f"after the buffer wrapped (n_added={n_added}, capacity={capacity}, W={W})"
                )
                check_slot(rb, int(slot), truth, g_slot, W)
            if n_added >= capacity:
                # sample is not overly strict: every slot but the W oldest can be drawn
                oldest = {(rb.ptr + k) % capacity for k in range(W)}
                drawn = set(rb.sample_slots(40 * capacity, rng).tolist())
                assert set(range(capacity)) - oldest <= drawn
    assert n_added > 2 * capacity


def test_windows_of_all_intact_slots_after_wrap(vdn):
    """Direct check of windows() on every slot whose data is intact after several wraps."""
    W, capacity = 8, 30
    rb, truth = make_rb(vdn, capacity, W), Truth()
    for ep, length in enumerate([9, 25, 4, 31, 16]):
        truth.add_synthetic(rb, ep, length)
    n_added = len(truth.items)
    checked = 0
    for slot, g in slot_owner(n_added, capacity).items():
        if window_intact(truth, g, n_added, capacity, W):
            check_slot(rb, slot, truth, g, W)
            checked += 1
    # the buffer holds transitions 55..84: episode 3 (38..68) has an intact window (its W-1 earlier steps and
    # the previous action of the first, g - W >= 55) at g = 63..68, episode 4 (69..84) at all its 16 steps
    assert checked == 6 + 16


@torch.no_grad()
def recompute_next_values(vdn, rb, slots, state_dict):
    """Q_tot(h', a_bar') = sum_i max_{a available} Q_i(h'_i, a) of the given slots, recomputed now with a
    plain-torch network (no C++ kernel) holding state_dict; windows from rb.windows (checked above)."""
    net = vdn.QNetworks(N, OBS, A, 64, use_kernel=False)
    net.load_state_dict(state_dict)
    _, _, next_obs_w, next_prev_w = rb.windows(slots)
    q = net(torch.from_numpy(next_obs_w), torch.from_numpy(next_prev_w)).numpy().astype(np.float64)
    return np.where(rb.next_avail[slots], q, -np.inf).max(-1).sum(-1)


def test_cached_target_values_equal_recomputation_in_the_training_loop(vdn, tmp_path):
    """The script's cache of Q_tot(h', a_bar'; theta-) (rb.next_value / rb.value_version) as its own loop
    leaves it: robust_vdn_rho.py as __main__, 3 episodes x 25 steps, hard copies every 30 steps (at 30 and
    60), a 12-slot buffer overwritten more than once within the last target period (steps 61-75).
    Every slot the loop marks as computed for the current theta- (and whose window is intact) must hold
    the value recomputed now from theta- (not from theta); the slot written at step 75 (no update there)
    is marked never computed. Fails if add() kept the version of an overwritten slot, if stale() missed a
    slot, if a hard copy did not invalidate the cache, or if the values came from the online network."""
    W, capacity = 4, 12
    g = run_script_in_process(
        SCRIPT,
        [
            "--total-episodes",
            3,
            "--episode-steps",
            25,
            "--window",
            W,
            "--buffer-size",
            capacity,
            "--learning-starts",
            8,
            "--batch-size",
            8,
            "--target-network-frequency",
            30,
            "--torch-threads",
            1,
            "--log-every",
            100,
            "--run-name",
            "cache",
        ],
        str(tmp_path),
    )
    rb = g["rb"]
    assert g["global_step"] == 75 and rb.version == 75 // 30  # the buffer counted both hard copies
    assert set(rb.value_version.tolist()) <= {-1, 0, 1, 2}
    assert rb.value_version[(rb.ptr - 1) % capacity] == -1  # written at step 75, after the last update (step 74)
    oldest = {(rb.ptr + k) % capacity for k in range(W)}  # windows may have lost data: never sampled
    current = np.array([s for s in range(capacity) if s not in oldest and rb.value_version[s] == 2])
    assert len(current) >= 4, rb.value_version
    want = recompute_next_values(vdn, rb, current, g["target_network"].state_dict())
    np.testing.assert_allclose(rb.next_value[current], want, rtol=1e-5, atol=1e-5)
    online = recompute_next_values(vdn, rb, current, g["q_network"].state_dict())
    assert np.abs(online - want).max() > 1e-3  # theta != theta-: the check above tells them apart


def test_stale_joins_the_newest_stale_slots(vdn):
    """rb.stale(idx): the sampled slots without a value for the buffer's version rb.version, plus (only when
    there are any) the stale slots among the newest ones; nothing when every sampled slot is fresh."""
    W, capacity = 4, 10
    rb, truth = make_rb(vdn, capacity, W), Truth()
    truth.add_synthetic(rb, 0, 6)  # slots 0..5, all never computed
    assert rb.version == 0
    assert rb.stale(np.array([1, 4]), newest=2).tolist() == [1, 4, 5]  # + newest stale 4, 5
    rb.value_version[[1, 4, 5]] = 0
    assert rb.stale(np.array([1, 4, 5]), newest=3).tolist() == []  # all fresh: no call at all
    assert rb.stale(np.array([0, 5]), newest=3).tolist() == [0, 3]  # newest are 3, 4, 5; 4, 5 fresh
    truth.add_synthetic(rb, 1, 7)  # wraps: ptr is 3, newest slots 2, 1, 0 (overwritten: stale again)
    rb.value_version[:] = 0
    rb.target_changed()  # a hard copy: every cached value is stale
    assert rb.version == 1 and rb.stale(np.array([5]), newest=0).tolist() == [5]
    rb.value_version[:] = 1
    rb.value_version[[0, 8]] = -1
    assert rb.stale(np.array([8, 8, 5]), newest=3).tolist() == [0, 8]  # unique, sorted, across the wrap


def test_sample_returns_batches_and_caches_next_values(vdn):
    """rb.sample(B, rng, next_values, n): the slots sample_slots draws (the same rng draws), as Batches of the
    stored arrays (and windows); next_values is called once, with a Batch of exactly rb.stale(idx), its values
    cached for rb.version; a second draw of fresh slots calls nothing; after target_changed() everything is
    recomputed; n = 2 splits one draw of 2B slots into halves."""
    W, capacity = 4, 40
    rb, truth = make_rb(vdn, capacity, W), Truth()
    for ep, length in enumerate([9, 14, 7]):
        truth.add_synthetic(rb, ep, length)
    calls = []

    def next_values(b):  # a value per slot that names the slot and the version
        calls.append(b.idx.copy())
        assert isinstance(b, vdn.Batch)
        return torch.from_numpy(b.idx * 10.0 + rb.version)

    idx = rb.sample_slots(8, np.random.default_rng(5))
    want_todo = rb.stale(idx)
    b = rb.sample(8, np.random.default_rng(5), next_values)
    np.testing.assert_array_equal(b.idx, idx)
    assert len(calls) == 1 and np.array_equal(calls[0], want_todo) and set(idx) <= set(want_todo.tolist())
    for name in ("state", "actions", "reward", "terminated", "next_state", "next_avail"):
        assert torch.equal(getattr(b, name), torch.from_numpy(getattr(rb, name)[idx])), name
    assert torch.equal(b.next_value, torch.from_numpy((idx * 10.0).astype(np.float32)))
    assert (rb.value_version[want_todo] == 0).all()
    for got, want in zip([*b.history, *b.next_history], rb.windows(idx)):
        assert torch.equal(got, torch.from_numpy(want))
    again = rb.sample(8, np.random.default_rng(5), next_values)  # the same slots, all fresh now
    assert len(calls) == 1 and torch.equal(again.next_value, b.next_value)
    rb.target_changed()
    again = rb.sample(8, np.random.default_rng(5), next_values)
    assert len(calls) == 2 and torch.equal(again.next_value, torch.from_numpy((idx * 10.0 + 1).astype(np.float32)))
    idx2 = rb.sample_slots(16, np.random.default_rng(6))
    first, second = rb.sample(8, np.random.default_rng(6), next_values, n=2)
    np.testing.assert_array_equal(first.idx, idx2[:8])
    np.testing.assert_array_equal(second.idx, idx2[8:])
    both = torch.cat([first.next_value, second.next_value])
    assert torch.equal(both, torch.from_numpy((idx2 * 10.0 + 1).astype(np.float32)))
