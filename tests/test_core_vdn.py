"""The VDN robust TD target of algos/robust_vdn_rho.py (Alg. 2 l.12-15, Eq. 15 and Eq. 27-28).

Every expected number is written out by hand below.

The target max sum_i max_{a available} Q_i(h'_i, a; theta-) is the script's own module-level
``target_values`` on a replay ``Batch`` (the function the training loop's replay buffer fills its
V' cache from), and the acting rule is checked through the script's masked_argmax.
"""

import numpy as np
import pytest
import torch

N, OBS, STATE, A = 2, 5, 10, 4


def t(x):
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize(
    "r,v,gamma,rho,expected",
    [
        # y = r + gamma * (1 - rho) * V'
        (-1.0, -10.0, 0.9, 0.1, -1.0 + 0.9 * 0.9 * -10.0),  # = -1 - 8.1 = -9.1
        (-1.0, -10.0, 0.9, 0.0, -10.0),  # = -1 + 0.9 * -10
        (-2.5, -40.0, 0.997, 0.008, -2.5 - 0.997 * 0.992 * 40.0),  # = -2.5 - 39.56096 = -42.06096
        (3.0, 20.0, 0.5, 0.5, 3.0 + 0.5 * 0.5 * 20.0),  # = 3 + 5 = 8
    ],
)
def test_robust_target_hand_numbers(vdn, r, v, gamma, rho, expected):
    y = vdn.robust_target(t([r]), t([v]), t([0.0]), gamma, rho)
    assert y.item() == pytest.approx(expected, abs=1e-5)


def test_robust_target_written_out_values(vdn):
    y = vdn.robust_target(t([-1.0, -2.5]), t([-10.0, -40.0]), t([0.0, 0.0]), 0.9, 0.1)
    assert y.tolist() == pytest.approx([-9.1, -2.5 + 0.81 * -40.0], abs=1e-5)  # -9.1, -34.9
    assert y[1].item() == pytest.approx(-34.9, abs=1e-5)


def test_terminated_gives_reward_only(vdn):
    y = vdn.robust_target(t([-1.0, -1.0, 4.0]), t([-10.0, -10.0, 100.0]), t([1.0, 0.0, 1.0]), 0.9, 0.1)
    assert y.tolist() == pytest.approx([-1.0, -9.1, 4.0], abs=1e-6)
    y = vdn.robust_target(t([-1.0, 2.0]), t([-10.0, -30.0]), t([1.0, 1.0]), 0.9, 0.1, "batch-min")
    assert y.tolist() == pytest.approx([-1.0, 2.0], abs=1e-6)


def test_batch_min_hand_numbers(vdn):
    """y = r + gamma * [(1 - rho) V' + rho * min_batch V'] (general operator, Eq. 27-28)."""
    r, v = t([-1.0, -2.0, 0.5]), t([-10.0, -30.0, -20.0])
    y = vdn.robust_target(r, v, t([0.0, 0.0, 0.0]), 0.9, 0.1, "batch-min")
    # min V' = -30
    # y0 = -1   + 0.9 * (0.9 * -10 + 0.1 * -30) = -1   + 0.9 * -12 = -11.8
    # y1 = -2   + 0.9 * (0.9 * -30 + 0.1 * -30) = -2   + 0.9 * -30 = -29.0
    # y2 = 0.5  + 0.9 * (0.9 * -20 + 0.1 * -30) = 0.5  + 0.9 * -21 = -18.4
    assert y.tolist() == pytest.approx([-11.8, -29.0, -18.4], abs=1e-5)
    # at rho = 0 both forms are plain VDN
    y0 = vdn.robust_target(r, v, t([0.0, 0.0, 0.0]), 0.9, 0.0, "batch-min")
    assert y0.tolist() == pytest.approx([-10.0, -29.0, -17.5], abs=1e-5)


# ------------------------------------------------------------------------------------------------
# rho = 0: the standard VDN target from a small Q table, with unavailable actions
# ------------------------------------------------------------------------------------------------

# Q_i(h', .) of agents 0 and 1 (4 actions): a bias-only target network returns these for any window
Q_TABLE = [[1.0, 5.0, 2.0, -3.0], [-3.0, -1.0, -4.0, -2.0]]


def bias_only_net(vdn, table):
    net = vdn.QNetworks(N, OBS, A, 8)
    with torch.no_grad():
        net.drqn.fc_out.weight.zero_()
        net.drqn.fc_out.bias.copy_(torch.tensor(table))  # agent k's Q-values are row k
    return net


def filled_buffer(vdn, next_avails, rewards):
    rb = vdn.ReplayBuffer(16, N, OBS, STATE, A, 3)
    rng = np.random.default_rng(0)
    for k, (av, r) in enumerate(zip(next_avails, rewards)):
        rb.add(
            rng.normal(size=(N, OBS)).astype(np.float32),
            np.zeros(STATE, np.float32),
            rng.integers(0, A, N),
            r,
            rng.normal(size=(N, OBS)).astype(np.float32),
            np.zeros(STATE, np.float32),
            av,
            0.0,
            0.0,
            k,
        )
    return rb


def test_rho0_is_standard_vdn_target(vdn):
    all_avail = np.ones((N, A), bool)
    masked = all_avail.copy()
    masked[0, 1] = False  # agent 0's best action (5.0) unavailable -> its max is 2.0
    masked[1, 1] = False  # agent 1's best action (-1.0) unavailable -> its max is -2.0
    rb = filled_buffer(vdn, [all_avail, masked], [-1.0, -3.0])
    net = bias_only_net(vdn, Q_TABLE)
    v = vdn.target_values(vdn.Batch(rb, np.array([0, 1])), net)
    # sum_i max_a Q_i:  all available: 5 + (-1) = 4;  masked: 2 + (-2) = 0
    assert v.tolist() == pytest.approx([4.0, 0.0], abs=1e-6)
    y = vdn.robust_target(torch.from_numpy(rb.reward[[0, 1]]), v, t([0.0, 0.0]), 0.9, 0.0)
    # y = r + gamma * sum_i max_a Q_i:  -1 + 0.9 * 4 = 2.6;  -3 + 0.9 * 0 = -3
    assert y.tolist() == pytest.approx([2.6, -3.0], abs=1e-5)
    y = vdn.robust_target(torch.from_numpy(rb.reward[[0, 1]]), v, t([0.0, 0.0]), 0.9, 0.25)
    # rho = 0.25: -1 + 0.9 * 0.75 * 4 = 1.7;  -3 + 0 = -3
    assert y.tolist() == pytest.approx([1.7, -3.0], abs=1e-5)


def test_target_max_never_takes_unavailable_action(vdn):
    """Random masks, the unavailable action always holding the largest Q."""
    rng = np.random.default_rng(5)
    table = [[10.0, 1.0, 2.0, 3.0], [-1.0, -5.0, 7.0, -2.0]]  # largest: action 0 / action 2
    net = bias_only_net(vdn, table)
    avails = []
    for _ in range(12):
        av = rng.random((N, A)) < 0.6
        av[0, 0] = av[1, 2] = False  # the largest Q of each agent is never available
        if not av[0].any():
            av[0, 3] = True
        if not av[1].any():
            av[1, 0] = True
        avails.append(av)
    rb = filled_buffer(vdn, avails, [0.0] * len(avails))
    v = vdn.target_values(vdn.Batch(rb, np.arange(len(avails))), net)
    for k, av in enumerate(avails):
        expected = sum(max(table[i][a] for a in range(A) if av[i, a]) for i in range(N))
        assert v[k].item() == pytest.approx(expected, abs=1e-6)
        assert v[k].item() < 10.0 + 7.0


def test_acting_never_takes_unavailable_action(vdn):
    """Greedy acting (masked_argmax on greedy_q) and the exploration draw of the loop."""
    net = bias_only_net(vdn, Q_TABLE)
    obs_w, prev_w = torch.zeros(3, 1, N, OBS), torch.zeros(3, 1, N, dtype=torch.long)
    q = net.greedy_q(obs_w, prev_w)[0]
    avail = torch.ones(N, A, dtype=torch.bool)
    assert vdn.masked_argmax(q, avail).tolist() == [1, 1]
    avail[0, 1] = avail[1, 1] = False
    assert vdn.masked_argmax(q, avail).tolist() == [2, 3]  # next best available: 2.0 and -2.0
    # exploration as in the loop: np.argmax(rng.random((N, A)) * avail, axis=1), uniform over available
    rng = np.random.default_rng(0)
    av = np.zeros((N, A), bool)
    av[0, [0, 3]] = True
    av[1, 2] = True
    counts = np.zeros((N, A), int)
    for _ in range(400):
        draws = np.argmax(rng.random((N, A)) * av, axis=1)
        counts[np.arange(N), draws] += 1
    assert counts[~av].sum() == 0
    assert counts[0, 0] > 150 and counts[0, 3] > 150 and counts[1, 2] == 400


def test_linear_schedule(vdn):
    assert vdn.linear_schedule(1.0, 0.01, 100, 0) == 1.0
    assert vdn.linear_schedule(1.0, 0.01, 100, 50) == pytest.approx(1.0 - 0.99 * 0.5)
    assert vdn.linear_schedule(1.0, 0.01, 100, 100) == pytest.approx(0.01)
    assert vdn.linear_schedule(1.0, 0.01, 100, 10_000) == pytest.approx(0.01)
