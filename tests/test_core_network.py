"""Agent networks of algos/robust_vdn_rho.py against plain torch.nn reference modules.

The reference is the released architecture written out with standard modules on the explicit
input concatenation [obs, one_hot(prev_action)] (+ one_hot(agent id) when shared):
Linear(in, 64) -> ReLU -> LSTM(64, 64) from a zero state -> last output -> ReLU -> Linear(64, 200).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import import_file
from torch import nn

N, OBS, A, H, W = 6, 5, 200, 64, 8
EVAL = import_file("eval_for_network_tests", "eval.py")  # the released-format converters

# paper-facts: the released per-agent checkpoint format, keys and shapes
AUTHORS_SHAPES = {
    "fc1.weight": (64, 205),
    "fc1.bias": (64,),
    "lstm.weight_ih_l0": (256, 64),
    "lstm.weight_hh_l0": (256, 64),
    "lstm.bias_ih_l0": (256,),
    "lstm.bias_hh_l0": (256,),
    "fc_out.weight": (200, 64),
    "fc_out.bias": (200,),
}


class RefAgent(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, H)
        self.lstm = nn.LSTM(H, H)
        self.fc_out = nn.Linear(H, A)

    def forward(self, x):  # x (W, B, in_dim)
        out, _ = self.lstm(F.relu(self.fc1(x)))  # zero initial state
        return self.fc_out(F.relu(out[-1]))


def ref_input(obs_w, prev_w, agent_id=None):
    """Explicit [obs, one_hot(prev, 200) (, one_hot(id, 6))] for one agent: (W, B, in_dim)."""
    parts = [obs_w, F.one_hot(prev_w, A).float()]
    if agent_id is not None:
        parts.append(F.one_hot(torch.full(prev_w.shape, agent_id), N).float())
    return torch.cat(parts, -1)


def authors_dict(ref: RefAgent) -> dict:
    """The authors' key names, filled from the reference module's parameters by hand."""
    return {
        "fc1.weight": ref.fc1.weight.detach().clone(),
        "fc1.bias": ref.fc1.bias.detach().clone(),
        "lstm.weight_ih_l0": ref.lstm.weight_ih_l0.detach().clone(),
        "lstm.weight_hh_l0": ref.lstm.weight_hh_l0.detach().clone(),
        "lstm.bias_ih_l0": ref.lstm.bias_ih_l0.detach().clone(),
        "lstm.bias_hh_l0": ref.lstm.bias_hh_l0.detach().clone(),
        "fc_out.weight": ref.fc_out.weight.detach().clone(),
        "fc_out.bias": ref.fc_out.bias.detach().clone(),
    }


def copy_into(net, k: int, ref: RefAgent):
    """Load reference agent ``ref`` into network k of a script's QNetworks, through the released
    per-agent format (the loader eval.py uses for the authors' checkpoints)."""
    EVAL.load_agent_state_dict(net.drqn, k, authors_dict(ref))


def random_windows(B, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([10.0, 10.0, 5.0, 1.0, 0.5])
    offset = torch.tensor([22.0, 25.0, 12.0, 0.5, 0.0])
    obs = torch.randn(W, B, N, OBS, generator=g) * scale + offset
    prev = torch.randint(0, A, (W, B, N), generator=g)
    prev[:3, 0] = 0  # front padding style: obs zero, previous action 0
    obs[:3, 0] = 0.0
    return obs, prev


@pytest.fixture(scope="module")
def refs():
    torch.manual_seed(1234)
    agents = [RefAgent(OBS + A) for _ in range(N)]
    for r in agents:  # larger random weights than default init so that differences show
        with torch.no_grad():
            r.fc_out.bias.uniform_(-1, 1)
    return agents


@pytest.fixture(scope="module")
def qnet(vdn, refs):
    torch.manual_seed(99)  # different init: only the copy can make it agree
    net = vdn.QNetworks(N, OBS, A, H, share_params=False)
    for i, r in enumerate(refs):
        copy_into(net, i, r)
    return net


def ref_q(refs, obs, prev):
    with torch.no_grad():
        return torch.stack([refs[i](ref_input(obs[:, :, i], prev[:, :, i])) for i in range(N)], 1)


def test_state_dict_is_stacked_authors_format(vdn):
    """Each parameter is stacked over the agents; slice k is agent k's released tensor."""
    net = vdn.QNetworks(N, OBS, A, H)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    assert len(sd) == len(AUTHORS_SHAPES) + 1  # fc1.weight kept as obs columns + one-hot table
    assert tuple(sd["drqn.fc1.weight_obs"].shape) == (N, H, OBS) and tuple(sd["drqn.fc1.weight_onehot"].shape) == (N, A, H)
    for key, shape in AUTHORS_SHAPES.items():  # every other released name, with a leading agent dimension
        if key != "fc1.weight":
            assert tuple(sd["drqn." + key].shape) == (N, *shape)
    for k in range(N):
        own = EVAL.agent_state_dict(net.drqn, k)
        assert {key: tuple(v.shape) for key, v in own.items()} == AUTHORS_SHAPES
        torch.testing.assert_close(own["lstm.weight_hh_l0"], net.drqn.lstm.weight_hh_l0[k], atol=0, rtol=0)
        torch.testing.assert_close(own["fc1.weight"][:, OBS + 7], net.drqn.fc1.weight_onehot[k, 7], atol=0, rtol=0)
    bad = dict(EVAL.agent_state_dict(net.drqn, 0), **{"fc1.weight": torch.zeros(H, OBS + A - 1)})
    with pytest.raises(RuntimeError, match="fc1.weight"):
        EVAL.load_agent_state_dict(net.drqn, 0, bad)
    with pytest.raises(RuntimeError, match="fc_out.bias"):
        EVAL.load_agent_state_dict(
            net.drqn, 0, {k: v for k, v in EVAL.agent_state_dict(net.drqn, 1).items() if k != "fc_out.bias"}
        )
    torch.testing.assert_close(net.drqn.fc1.weight_obs[0], sd["drqn.fc1.weight_obs"][0], atol=0, rtol=0)  # nothing half-loaded


def test_init_matches_torch_nn_ranges(vdn):
    """Default init as nn.Linear / nn.LSTM: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per agent."""
    torch.manual_seed(0)
    d = vdn.QNetworks(N, OBS, A, H).drqn
    for p, fan_in in [
        (d.fc1.weight_obs, OBS + A),
        (d.fc1.weight_onehot, OBS + A),
        (d.fc1.bias, OBS + A),
        (d.lstm.weight_ih_l0, H),
        (d.lstm.weight_hh_l0, H),
        (d.lstm.bias_ih_l0, H),
        (d.lstm.bias_hh_l0, H),
        (d.fc_out.weight, H),
        (d.fc_out.bias, H),
    ]:
        bound = fan_in**-0.5
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert not torch.equal(d.fc_out.weight[0], d.fc_out.weight[1])  # agents initialised independently


def test_kernel_and_torch_paths_agree_with_gradients(vdn, refs):
    """fused's C++ path and the plain-torch path give the same Q-values and gradients."""
    obs, prev = random_windows(16, 11)
    taken = torch.randint(0, A, (16, N, 1), generator=torch.Generator().manual_seed(3))
    grads = []
    for use_kernel in (True, False):
        net = vdn.QNetworks(N, OBS, A, H, use_kernel=use_kernel)
        for i, r in enumerate(refs):
            copy_into(net, i, r)
        q = net(obs, prev)
        torch.testing.assert_close(q.detach(), ref_q(refs, obs, prev), atol=1e-5, rtol=0)
        q.gather(-1, taken).sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("B,seed", [(1, 0), (7, 1), (32, 2)])
def test_forward_equals_reference(qnet, refs, B, seed):
    obs, prev = random_windows(B, seed)
    with torch.no_grad():
        q = qnet(obs, prev)
    expected = ref_q(refs, obs, prev)
    assert q.shape == (B, N, A)
    torch.testing.assert_close(q, expected, atol=1e-6, rtol=0)
    # the per-agent nets are really different (no accidental sharing)
    assert not torch.allclose(expected[:, 0], expected[:, 1])


@pytest.mark.parametrize("B,seed", [(1, 3), (16, 4)])
def test_greedy_q_equals_forward(qnet, refs, B, seed):
    obs, prev = random_windows(B, seed)
    with torch.no_grad():
        q = qnet(obs, prev)
    g = qnet.greedy_q(obs, prev)
    torch.testing.assert_close(g, q, atol=1e-5, rtol=0)
    torch.testing.assert_close(g, ref_q(refs, obs, prev), atol=1e-5, rtol=0)


def test_window_order_matters(qnet, refs):
    """The last window position is the current step: reversing the window changes Q."""
    obs, prev = random_windows(4, 5)
    with torch.no_grad():
        q = qnet(obs, prev)
        q_rev = qnet(obs.flip(0), prev.flip(0))
    torch.testing.assert_close(q_rev, ref_q(refs, obs.flip(0), prev.flip(0)), atol=1e-6, rtol=0)
    assert (q - q_rev).abs().max() > 1e-3


def test_authors_dir_loads_and_reproduces_reference(eval_mod, refs, tmp_path):
    for i, r in enumerate(refs):
        sd = authors_dict(r)
        assert {k: tuple(v.shape) for k, v in sd.items()} == AUTHORS_SHAPES
        torch.save(sd, os.path.join(tmp_path, f"agent_{i}_q_network.pt"))
    _label, _module, net, env_info, a = eval_mod.load_authors_dir(str(tmp_path), torch.device("cpu"))
    assert env_info["n_agents"] == N and env_info["obs_dim"] == OBS and env_info["n_actions"] == A
    assert a["window"] == W
    obs, prev = random_windows(9, 6)
    expected = ref_q(refs, obs, prev)
    with torch.no_grad():
        torch.testing.assert_close(net(obs, prev), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(net.greedy_q(obs, prev), expected, atol=1e-5, rtol=0)


def test_authors_dir_agent_order(eval_mod, refs, tmp_path):
    """agent_{i} goes to agent i (files are not loaded in listing order by accident)."""
    for i in [3, 0, 5, 1, 4, 2]:
        torch.save(authors_dict(refs[i]), os.path.join(tmp_path, f"agent_{i}_q_network.pt"))
    _, _, net, _, _ = eval_mod.load_authors_dir(str(tmp_path), torch.device("cpu"))
    for i in range(N):
        torch.testing.assert_close(net.drqn.fc_out.bias[i], refs[i].fc_out.bias, atol=0, rtol=0)


def test_shared_params_equals_one_module_with_agent_id(vdn):
    torch.manual_seed(7)
    ref = RefAgent(OBS + A + N)
    with torch.no_grad():
        ref.fc1.weight.mul_(3.0)  # make the id columns matter clearly
    torch.manual_seed(8)
    net = vdn.QNetworks(N, OBS, A, H, share_params=True)
    assert tuple(net.drqn.fc1.weight_onehot.shape) == (1, A + N, H)
    copy_into(net, 0, ref)
    obs, prev = random_windows(5, 7)
    obs[:, :, 1] = obs[:, :, 0]  # agents 0 and 1 see the same history: only the id differs
    prev[:, :, 1] = prev[:, :, 0]
    with torch.no_grad():
        expected = torch.stack([ref(ref_input(obs[:, :, i], prev[:, :, i], agent_id=i)) for i in range(N)], 1)
        q = net(obs, prev)
    torch.testing.assert_close(q, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(net.greedy_q(obs, prev), expected, atol=1e-5, rtol=0)
    assert (q[:, 0] - q[:, 1]).abs().max() > 1e-4  # the agent id input is used


def test_masked_argmax_never_picks_unavailable(vdn):
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        q = torch.randn(16, N, A, generator=g) * 5
        avail = torch.rand(16, N, A, generator=g) < (0.02 + 0.5 * trial / 50)
        # at least one available action per agent; and put the global max on an unavailable action
        avail[..., int(torch.randint(0, A, (1,), generator=g))] = True
        blocked = (~avail).nonzero()
        if len(blocked):
            b, n, a = blocked[0].tolist()
            q[b, n, a] = 1e6
        chosen = vdn.masked_argmax(q, avail)
        assert chosen.shape == (16, N)
        assert avail.gather(-1, chosen.unsqueeze(-1)).all()
        qn, an, cn = q.numpy(), avail.numpy(), chosen.numpy()
        for b in range(16):
            for n in range(N):
                best = max(qn[b, n, k] for k in range(A) if an[b, n, k])  # by hand
                assert qn[b, n, cn[b, n]] == best


def test_masked_argmax_single_available_action(vdn):
    q = torch.arange(A, dtype=torch.float32).repeat(2, N, 1)  # largest value at the last action
    avail = torch.zeros(2, N, A, dtype=torch.bool)
    for n in range(N):
        avail[:, n, 10 * n + 3] = True
    chosen = vdn.masked_argmax(q, avail)
    assert chosen.tolist() == [[10 * n + 3 for n in range(N)]] * 2
