"""The cached target value Q_tot(h', a_bar'; theta-) of every script (module-level ``target_values`` of a replay
``Batch``, the function the replay buffer fills its V' cache from):
computed from the explicit per-agent forward pass (not greedy_q) on random masks under which some
agents' best actions are unavailable, so a max or argmax that ignored the mask would show; a terminated
transition's next state is terminal, V' = 0 (what --worst-value batch-min's minimum then sees)."""

import numpy as np
import pytest
import torch
from conftest import import_file

N, OBS, STATE, A, W = 3, 4, 5, 6, 3


def filled_buffer(module, seed=0, size=10):
    rng = np.random.default_rng(seed)
    rb = module.ReplayBuffer(32, N, OBS, STATE, A, W)
    for k in range(size):
        avail = rng.random((N, A)) < 0.5
        avail[np.arange(N), rng.integers(0, A, N)] = True  # at least one available action each
        now = (np.ones((N, A), bool),) if "qtran" in module.__name__ else ()  # QTRAN also stores avail(h)
        rb.add(
            rng.normal(size=(N, OBS)).astype(np.float32),
            rng.normal(size=STATE).astype(np.float32),
            rng.integers(0, A, N),
            -1.0,
            rng.normal(size=(N, OBS)).astype(np.float32),
            rng.normal(size=STATE).astype(np.float32),
            avail,
            float(k % 5 == 4),
            0.0,
            k % 4,
            *now,
        )  # 4, 9 terminate
    return rb


def explicit_next_q(module, net, rb, idx):
    """Q_i(h'_i, .; theta-) through the plain per-agent forward()."""
    _, _, next_obs_w, next_prev_w = rb.windows(idx)
    with torch.no_grad():
        q = net(torch.from_numpy(next_obs_w), torch.from_numpy(next_prev_w))
    return q


@pytest.mark.parametrize(
    "name", ["robust_vdn_rho", "robust_vdn_tv", "robust_qmix_rho", "robust_qmix_tv", "robust_qtran_rho", "robust_qtran_tv"]
)
def test_target_values_match_explicit_masked_computation(name):
    module = import_file(f"{name}_targets", f"algos/{name}.py")
    torch.manual_seed(0)
    net = module.QNetworks(N, OBS, A, 16, False)
    rb = filled_buffer(module)
    idx = np.arange(10)
    q = explicit_next_q(module, net, rb, idx)
    avail = torch.from_numpy(rb.next_avail[idx])
    masked = q.masked_fill(~avail, -float("inf"))
    # the mask must matter: in some rows an agent's best action is unavailable
    assert (q.max(-1).values > masked.max(-1).values).any()
    if "vdn" in name:
        expected = masked.max(-1).values.sum(-1)
        got = module.target_values(module.Batch(rb, idx), net)
    elif "qmix" in name:
        mixer = module.QMixer(N, STATE, 8)
        with torch.no_grad():
            expected = mixer(masked.max(-1).values, torch.from_numpy(rb.next_state[idx]))  # target mixer on s'
        got = module.target_values(module.Batch(rb, idx), net, mixer)
    else:
        qtran = module.QTranNetworks(N, A, STATE, 16)
        _, _, next_obs_w, next_prev_w = rb.windows(idx)
        with torch.no_grad():
            _, feats = net(torch.from_numpy(next_obs_w), torch.from_numpy(next_prev_w), with_features=True)
            expected = qtran.q_jt(feats.sum(1), masked.argmax(-1))  # Q_jt at the masked per-agent argmax
        got = module.target_values(module.Batch(rb, idx), net, qtran)
    terminal = rb.terminated[idx] > 0
    assert terminal.sum() == 2 and np.abs(expected.numpy()[terminal]).min() > 1e-3  # the network's value there is not 0
    assert isinstance(got, torch.Tensor) and got.shape == (10,)  # a tensor, V' per slot
    np.testing.assert_allclose(got.numpy(), np.where(terminal, 0.0, expected.numpy()), rtol=1e-5, atol=1e-5)
