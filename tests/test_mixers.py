"""Factorisation networks of the QMIX and QTRAN scripts against Theorem 2's conditions.

* QMIX (Eq. 11): dQ_tot/dQ_i >= 0 by autograd, and on small enumerated instances the per-agent
  argmaxes maximise Q_tot (IGM).
* QTRAN (Eq. 12-13): L_opt = L_nopt = 0 exactly when Q_jt, V_tot and the Q_i satisfy the QTRAN
  condition of Theorem 2, > 0 when it is violated; Q-hat is detached.
* The batched/embedding shortcuts in the networks compute the same numbers as the plain layers.

That the other scripts' copies of these networks are the same code: tests/test_copy_drift.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import import_file


@pytest.fixture(scope="module")
def qmix():
    return import_file("robust_qmix_rho_under_test", "algos/robust_qmix_rho.py")


@pytest.fixture(scope="module")
def qtran():
    return import_file("robust_qtran_rho_under_test", "algos/robust_qtran_rho.py")


# ---------------------------------------------------------------------------------------------
# QMIX
# ---------------------------------------------------------------------------------------------
def _random_mixer(qmix, n_agents, state_dim, seed, scale=1.0):
    torch.manual_seed(seed)
    mixer = qmix.QMixer(n_agents, state_dim, 32).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.mul_(scale)
    return mixer


@pytest.mark.parametrize("seed", range(5))
def test_qmix_monotone_in_every_agent(qmix, seed):
    """Thm. 2 QMIX condition: dQ_tot/dQ_i >= 0 for every agent, state and input, by autograd."""
    mixer = _random_mixer(qmix, 6, 10, seed, scale=1.0 + seed)
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(256, 10, generator=g, dtype=torch.float64) * 50.0  # building states are unscaled
    q = (torch.randn(256, 6, generator=g, dtype=torch.float64) * 100.0).requires_grad_()
    mixer(q, state).sum().backward()  # Q_tot[b] depends on q[b] only: grad = per-sample dQ_tot/dQ_i
    assert (q.grad >= 0).all()
    assert (q.grad > 0).any()


@pytest.mark.parametrize("seed", range(20))
def test_qmix_per_agent_argmax_maximises_q_tot(qmix, seed):
    """IGM on an enumerated instance: 3 agents x 4 actions, all 64 joint actions."""
    n_agents, n_actions = 3, 4
    mixer = _random_mixer(qmix, n_agents, 5, seed)
    g = torch.Generator().manual_seed(100 + seed)
    q_i = torch.randn(n_agents, n_actions, generator=g, dtype=torch.float64)  # Q_i(h_i, a_i)
    state = torch.randn(1, 5, generator=g, dtype=torch.float64)
    joint = torch.tensor(list(itertools.product(range(n_actions), repeat=n_agents)))  # (64, 3)
    q_joint = q_i[torch.arange(n_agents), joint]  # (64, 3): the agents' values at each joint action
    with torch.no_grad():
        q_tot = mixer(q_joint, state.expand(len(joint), -1))
    best = joint[q_tot.argmax()]
    assert torch.equal(best, q_i.argmax(-1))
    assert q_tot.max() == pytest.approx(q_tot[(joint == q_i.argmax(-1)).all(-1)].item())


def test_qmix_mixer_layout(qmix):
    """Hypernetwork shapes of paper F.2 / the released code: w1 N*32, b1 32, w2 32, V 32 -> 1."""
    mixer = qmix.QMixer(6, 10, 32)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes["hyper_w1.weight"] == (6 * 32, 10)
    assert shapes["hyper_b1.weight"] == (32, 10)
    assert shapes["hyper_w2.weight"] == (32, 10)
    assert shapes["hyper_v.0.weight"] == (32, 10) and shapes["hyper_v.2.weight"] == (1, 32)
    # Q_tot = ELU(q @ |w1| + b1) @ |w2| + V(s), written out
    s, q = torch.randn(4, 10), torch.randn(4, 6)
    w1 = mixer.hyper_w1(s).abs().view(4, 6, 32)
    hidden = F.elu(torch.einsum("bn,bne->be", q, w1) + mixer.hyper_b1(s))
    expected = (hidden * mixer.hyper_w2(s).abs()).sum(-1) + mixer.hyper_v(s).squeeze(-1)
    torch.testing.assert_close(mixer(q, s), expected)


# ---------------------------------------------------------------------------------------------
# QTRAN
# ---------------------------------------------------------------------------------------------
def _qtran_instance(seed, n_agents=3, n_actions=4):
    """Q_i, V_tot and a Q_jt satisfying Thm. 2's QTRAN condition: sum_i Q_i(a) - Q_jt(a) + V is 0 at
    a_bar = per-agent argmax and >= 0 elsewhere. Returns (joint actions, sum_i Q_i(a), Q_jt(a), V, a_bar index)."""
    g = torch.Generator().manual_seed(seed)
    q_i = torch.randn(n_agents, n_actions, generator=g, dtype=torch.float64)
    joint = torch.tensor(list(itertools.product(range(n_actions), repeat=n_agents)))
    q_sum = q_i[torch.arange(n_agents), joint].sum(-1)
    v = torch.randn((), generator=g, dtype=torch.float64)
    bar = int((joint == q_i.argmax(-1)).all(-1).nonzero())
    slack = torch.rand(len(joint), generator=g, dtype=torch.float64) * 2.0
    slack[bar] = 0.0
    q_jt = q_sum + v - slack
    return joint, q_sum, q_jt, v, bar


@pytest.mark.parametrize("seed", range(10))
def test_qtran_losses_vanish_under_the_qtran_condition(qtran, seed):
    joint, q_sum, q_jt, v, bar = _qtran_instance(seed)
    assert int(q_jt.argmax()) == bar  # the condition makes a_bar the argmax of Q_jt (IGM, Thm. 2)
    # every row of the "batch" is one joint action a of the same h; a_bar is the same for all rows
    n = len(joint)
    l_opt, l_nopt = qtran.qtran_losses(q_sum[bar].expand(n), q_jt[bar].expand(n), q_sum, q_jt, v.expand(n))
    assert l_opt.item() == pytest.approx(0.0, abs=1e-20)
    assert l_nopt.item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("seed", range(10))
def test_qtran_losses_positive_when_violated(qtran, seed):
    joint, q_sum, q_jt, v, bar = _qtran_instance(seed)
    v_all = v.expand(len(joint))
    # L_opt: equality at a_bar broken
    l_opt, _ = qtran.qtran_losses(q_sum[[bar]], q_jt[[bar]] + 0.3, q_sum, q_jt, v_all)
    assert l_opt.item() == pytest.approx(0.09)
    # L_nopt: some non-greedy joint action with Q_jt above sum_i Q_i + V
    other = (bar + 1 + seed) % len(joint)
    bad = q_jt.clone()
    bad[other] = q_sum[other] + v + 0.5
    _, l_nopt = qtran.qtran_losses(q_sum[[bar]], q_jt[[bar]], q_sum, bad, v_all)
    assert l_nopt.item() == pytest.approx(0.25 / len(joint))
    # positive slack (Q_jt below) is not penalised by L_nopt
    _, l_nopt = qtran.qtran_losses(q_sum[[bar]], q_jt[[bar]], q_sum, q_jt - 1.0, v_all)
    assert l_nopt.item() == 0.0


def test_qtran_losses_detach_q_jt(qtran):
    """Eq. (12)-(13): Q-hat is detached, so L_opt + L_nopt give no gradient to Q_jt."""
    q_sum_g, q_jt_g = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    q_sum_t, q_jt_t = torch.randn(8, requires_grad=True), (torch.randn(8) + 5.0).requires_grad_()
    v = torch.randn(8, requires_grad=True)
    l_opt, l_nopt = qtran.qtran_losses(q_sum_g, q_jt_g, q_sum_t, q_jt_t, v)
    (l_opt + l_nopt).backward()
    assert q_jt_g.grad is None and q_jt_t.grad is None
    assert q_sum_g.grad.abs().sum() > 0 and v.grad.abs().sum() > 0 and q_sum_t.grad.abs().sum() > 0


def test_qtran_networks_match_plain_layers(qtran):
    """Q_jt's action embedding (sum of weight columns) = Linear on the concatenated one-hot joint action."""
    torch.manual_seed(0)
    n_agents, n_actions, hidden = 6, 200, 64
    net = qtran.QTranNetworks(n_agents, n_actions, 10, hidden)
    f_sum, state = torch.randn(5, hidden), torch.randn(5, 10)
    actions = torch.randint(0, n_actions, (5, n_agents))
    onehot = F.one_hot(actions, n_actions).float().reshape(5, -1)
    a = F.relu(net.action_fc(onehot))
    expected = net.q_out(F.relu(net.q_fc(torch.cat([a, f_sum], -1)))).squeeze(-1)
    torch.testing.assert_close(net.q_jt(f_sum, actions), expected)
    assert net.v_tot(state, f_sum).shape == (5,)


@pytest.mark.parametrize("share_params", [False, True])
def test_qtran_features_fast_path_matches_forward(qtran, share_params):
    """greedy_q(..., with_features=True) (batched LSTM) = forward(..., with_features=True)."""
    torch.manual_seed(1)
    net = qtran.QNetworks(3, 5, 7, 16, share_params)
    obs, prev = torch.randn(8, 4, 3, 5), torch.randint(0, 7, (8, 4, 3))
    q_fast, f_fast = net.greedy_q(obs, prev, with_features=True)
    with torch.no_grad():
        q, f = net(obs, prev, with_features=True)
    torch.testing.assert_close(q_fast, q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f_fast, f, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(net.greedy_q(obs, prev), q, atol=1e-6, rtol=1e-5)
    assert f.shape == (4, 3, 16)
