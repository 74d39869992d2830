"""The scripts' robust targets against exact worst cases on random discrete next-state laws.

A "batch" here is the K possible next states h' of one (h, a), with values V' = Q_tot(h', a_bar'; theta-)
and nominal probabilities P0; the script's per-transition target averaged under P0 must equal
r + gamma * min_{P in the set} E_P[V'].

* rho-contamination (Eq. 7): the exact minimum over the set is attained at a point mass
  nu = delta_j (the objective is linear in nu): brute force over j.
* TV (Eq. 9): exact minimum by linear programming, and in closed form (move rho of mass from the
  highest values to the lowest); the script's target must equal both. The script's dual (Eq. 17) is
  minimised over eta exactly (the P0-weighted loss is convex piecewise linear in eta: its minimum is at
  a breakpoint V'_j or at a bound), then plugged into the script's target (Eq. 16).

TV convention (what the tests establish): the dual is exact for TV(P, P0) = 0.5 * ||P - P0||_1 <= rho
(rho = the probability mass the adversary may move), not for ||P - P0||_1 <= rho. The paper's range
eta in [0, 2/(rho(1-gamma))] (Eq. 10) does not decide the convention: the optimal eta is the
(1-rho)-quantile of V', so any upper bound >= max V' is never active, and with V' in
[0, 1/(1-gamma)] (rewards in [0, 1]) 2/(rho(1-gamma)) > max V'. Its lower bound 0 is what
Assumption 1/2 (min V = 0) needs; with negative values it forces eta = 0 and the nominal target.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import import_file
from scipy.optimize import linprog

RHO_SCRIPTS = ["robust_vdn_rho", "robust_qmix_rho", "robust_qtran_rho"]
TV_SCRIPTS = ["robust_vdn_tv", "robust_qmix_tv", "robust_qtran_tv"]
GAMMA = 0.9


def load(name):
    return import_file(f"{name}_under_test", f"algos/{name}.py")


def t64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def random_law(rng):
    k = int(rng.integers(5, 21))
    p0 = rng.dirichlet(np.ones(k) * rng.choice([0.3, 1.0, 3.0]))
    return k, p0


def contamination_worst(p0, v, rho):
    """min over nu in the simplex of E_{(1-rho) P0 + rho nu}[V], by brute force over nu = delta_j."""
    return min(((1 - rho) * p0 + rho * np.eye(len(v))[j]) @ v for j in range(len(v)))


def tv_worst_lp(p0, v, rho, l1_factor=0.5):
    """min_P E_P[V] s.t. l1_factor * ||P - P0||_1 <= rho, P in the simplex (variables P, t >= |P - P0|)."""
    k = len(v)
    eye = np.eye(k)
    a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, k)), l1_factor * np.ones((1, k))]])
    b_ub = np.concatenate([p0, -p0, [rho]])
    a_eq = np.concatenate([np.ones(k), np.zeros(k)])[None]
    res = linprog(np.concatenate([v, np.zeros(k)]), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=(0, None))
    assert res.status == 0
    return res.fun


def tv_worst_mass(p0, v, rho):
    """The same minimum in closed form: move rho of mass from the highest values to the lowest."""
    order = np.argsort(v)[::-1]
    p, budget = p0.copy(), min(rho, 1.0 - p0[order[-1]])
    for j in order[:-1]:
        take = min(p[j], budget)
        p[j] -= take
        p[order[-1]] += take
        budget -= take
    return p @ v


def dual_minimise(mod, p0, v, rho, worst_value, kind="linear"):
    """argmin over eta in the script's bounds of the P0-weighted dual loss (exact: breakpoints + bounds)."""
    values, weight = t64(v), t64(p0)
    lo, hi = mod.eta_bounds(values, GAMMA, rho, worst_value)
    candidates = torch.cat([values, lo[None], hi[None]]).clamp(lo, hi).unique()
    losses = torch.stack(
        [mod.dual_loss(torch.full_like(values, c.item()), values, rho, worst_value, kind, weight) for c in candidates]
    )
    i = int(losses.argmin())
    return candidates[i].item(), losses[i].item(), (lo.item(), hi.item())


def tv_script_backup(mod, p0, v, reward, rho, worst_value):
    """E_P0[y] of the script's Eq. (16) target with the dual-optimal eta: r + gamma * (robust expectation)."""
    eta, _, _ = dual_minimise(mod, p0, v, rho, worst_value)
    values = t64(v)
    y = mod.robust_target(t64(reward), values, torch.full_like(values, eta), t64(0.0), GAMMA, rho, worst_value)
    return float(t64(p0) @ y), eta


# ---------------------------------------------------------------------------------------------
# rho-contamination
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RHO_SCRIPTS)
@pytest.mark.parametrize("seed", range(8))
def test_contamination_target_is_the_exact_worst_case(name, seed):
    mod = load(name)
    rng = np.random.default_rng(seed)
    k, p0 = random_law(rng)
    rho, reward = rng.uniform(0.0, 0.99), rng.normal()

    def backup(v, worst_value):
        y = mod.robust_target(t64(reward), t64(v), t64(0.0), GAMMA, rho, worst_value)
        return float(t64(p0) @ y)

    # paper form (Assumption 1/2): V >= 0 with min V = 0 (the zero state may have P0 mass 0)
    v = rng.uniform(0.0, 1.0 / (1.0 - GAMMA), k)
    v[rng.integers(k)] = 0.0
    exact = reward + GAMMA * contamination_worst(p0, v, rho)
    assert backup(v, "zero") == pytest.approx(exact, rel=1e-10, abs=1e-10)
    assert backup(v, "batch-min") == pytest.approx(exact, rel=1e-10, abs=1e-10)
    # arbitrary (here negative, as in the building task) values: only the general operator is exact
    v = rng.normal(-300.0, 50.0, k)
    exact = reward + GAMMA * contamination_worst(p0, v, rho)
    assert backup(v, "batch-min") == pytest.approx(exact, rel=1e-10)
    if rho > 0:  # the paper form is then optimistic, not a worst case (DQN with discount gamma(1-rho))
        assert backup(v, "zero") > exact + 1e-9


@pytest.mark.parametrize("name", RHO_SCRIPTS)
def test_contamination_terminated_is_reward_only(name):
    mod = load(name)
    y = mod.robust_target(t64([1.0, 2.0]), t64([5.0, -7.0]), t64([1.0, 0.0]), 0.9, 0.1, "batch-min")
    assert y[0].item() == 1.0
    assert y[1].item() == pytest.approx(2.0 + 0.9 * (0.9 * -7.0 + 0.1 * -7.0))


# ---------------------------------------------------------------------------------------------
# TV
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TV_SCRIPTS)
@pytest.mark.parametrize("seed", range(8))
def test_tv_dual_target_is_the_exact_worst_case(name, seed):
    mod = load(name)
    rng = np.random.default_rng(seed)
    k, p0 = random_law(rng)
    rho, reward = float(rng.choice([1.0, rng.uniform(0.02, 1.0)])), rng.normal()

    # paper form (Assumption 1/2): V' in [0, 1/(1-gamma)], min V' = 0
    v = rng.uniform(0.0, 1.0 / (1.0 - GAMMA), k)
    v[rng.integers(k)] = 0.0
    got, eta = tv_script_backup(mod, p0, v, reward, rho, "zero")
    exact = reward + GAMMA * tv_worst_lp(p0, v, rho, l1_factor=0.5)
    assert got == pytest.approx(exact, abs=1e-8)
    assert got == pytest.approx(reward + GAMMA * tv_worst_mass(p0, v, rho), abs=1e-8)  # the closed form agrees
    lo, hi = mod.eta_bounds(t64(v), GAMMA, rho, "zero")
    assert lo.item() == 0.0 and hi.item() == pytest.approx(2.0 / (rho * (1.0 - GAMMA)))
    assert eta <= v.max() < hi.item()  # Eq. (10)'s upper bound is never active
    if rho < 1.0:  # the other convention, ||P - P0||_1 <= rho, is a smaller set: a larger minimum
        assert reward + GAMMA * tv_worst_lp(p0, v, rho, l1_factor=1.0) > got + 1e-9

    # general operator (Eq. 29, batch-min): arbitrary values, min V estimated by the batch minimum
    v = -200.0 + rng.uniform(0.0, 15.0, k)
    got, eta = tv_script_backup(mod, p0, v, reward, rho, "batch-min")
    assert got == pytest.approx(reward + GAMMA * tv_worst_lp(p0, v, rho), abs=1e-7)
    assert got == pytest.approx(reward + GAMMA * tv_worst_mass(p0, v, rho), abs=1e-7)
    lo, hi = mod.eta_bounds(t64(v), GAMMA, rho, "batch-min")
    assert lo.item() == v.min() and lo.item() <= eta < hi.item()
    # ... where the paper form (eta >= 0 > V') collapses to the nominal target E_P0[V']
    got_zero, eta_zero = tv_script_backup(mod, p0, v, reward, rho, "zero")
    assert eta_zero == 0.0 and got_zero == pytest.approx(reward + GAMMA * p0 @ v)


@pytest.mark.parametrize("name", TV_SCRIPTS)
def test_tv_target_formula(name):
    """Eq. (16) term by term, terminated -> r, and the batch-min shift of Eq. (29)."""
    mod = load(name)
    r, v, eta, term = t64([1.0, 1.0, 1.0]), t64([3.0, 0.5, 2.0]), t64([1.0, 1.0, 1.0]), t64([0.0, 0.0, 1.0])
    y = mod.robust_target(r, v, eta, term, 0.9, 0.25, "zero")
    expected = [1.0 + 0.9 * 0.75 * 1.0 - 0.9 * 0.0, 1.0 + 0.9 * 0.75 - 0.9 * 0.5, 1.0]
    torch.testing.assert_close(y, t64(expected))
    y = mod.robust_target(r, v, eta, term, 0.9, 0.25, "batch-min")
    m = 0.5
    expected = [1.0 + 0.9 * (m + 0.75 * (1.0 - m) - 0.0), 1.0 + 0.9 * (m + 0.75 * (1.0 - m) - 0.5), 1.0]
    torch.testing.assert_close(y, t64(expected))


@pytest.mark.parametrize("name", TV_SCRIPTS)
def test_dual_loss_forms(name):
    """linear = Eq. (17); squared = the released code's mean of squares; weights mask transitions."""
    mod = load(name)
    eta, v = t64([1.0, 4.0, -1.0]), t64([2.0, 1.0, 0.0])
    term = torch.relu(eta - v) - 0.7 * eta
    torch.testing.assert_close(mod.dual_loss(eta, v, 0.3, "zero", "linear"), term.mean())
    torch.testing.assert_close(mod.dual_loss(eta, v, 0.3, "zero", "squared"), (term**2).mean())
    torch.testing.assert_close(mod.dual_loss(eta, v, 0.3, "zero", "linear", t64([1.0, 0.0, 1.0])), term[[0, 2]].mean())
    shifted = torch.relu(eta - v) - 0.7 * (eta - v.min())
    torch.testing.assert_close(mod.dual_loss(eta, v, 0.3, "batch-min", "linear"), shifted.mean())
    # raw_eta: the clamped eta is evaluated, the raw output outside the range is pulled back to it
    raw = t64([1.0, 4.0, -1.0]).requires_grad_()
    clamped = raw.clamp(0.0, 3.0)
    loss = mod.dual_loss(clamped, v, 0.3, "zero", "linear", raw_eta=raw)
    expected = (torch.relu(clamped - v) - 0.7 * clamped).mean() + ((raw - clamped) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert raw.grad[1] > 0 and raw.grad[2] < 0  # above the range: pushed down; below: pushed up


def dual_groups(rng, worst_value, rho, n_groups=3, k=6, margin=0.08, gap=1.0):
    """n_groups transitions (s, a), each with k possible next values V' under its own law P0, drawn
    until the exact minimiser is clear-cut: P0's CDF steps over 1 - rho by >= margin on both sides at the
    (1 - rho)-quantile, the neighbouring values are >= gap away from it, and it is >= gap / 2 away from
    the other groups' minimisers."""
    groups = []
    while len(groups) < n_groups:
        p0 = rng.dirichlet(np.full(k, 2.0))
        v = np.sort(rng.uniform(0.0, 10.0, k)) + (0.0 if worst_value == "zero" else -40.0)
        if worst_value == "zero":
            v[0] = 0.0  # Assumption 1/2: min V = 0 (values >= 0)
        cdf = np.cumsum(p0)
        j = int(np.searchsorted(cdf, 1.0 - rho))  # closed form: the smallest V'_j with P0(V' <= V'_j) >= 1 - rho
        if (
            cdf[j] - (1 - rho) < margin
            or (j > 0 and (1 - rho) - cdf[j - 1] < margin)
            or np.diff(v).min() < gap
            or any(abs(v[j] - other) < gap / 2 for *_, other in groups)
        ):
            continue
        groups.append((p0, v, v[j]))
    return groups


@pytest.mark.parametrize("name", TV_SCRIPTS)
@pytest.mark.parametrize("worst_value", ["zero", "batch-min"])
def test_dual_network_converges_to_the_exact_dual_minimiser(name, worst_value):
    """The script's DualNetwork, trained with its dual_loss (Eq. 17, weights = P0, the scripts' clamp to
    Eq. (10)'s range) by Adam on 3 transitions (s, a) with known next-value laws, must output for each
    (s, a) the exact minimiser of its dual objective: the (1 - rho)-quantile of V' under P0 (closed form,
    cross-checked on a grid here), and the target built with it must equal r + gamma * the exact TV worst
    case (linear program). The quantiles' neighbours are >= 1 away, far outside the tolerance (0.1)."""
    mod = load(name)
    rng = np.random.default_rng(3)
    torch.manual_seed(0)
    rho, reward, n_agents, n_actions, state_dim = 0.3, -1.0, 3, 5, 10
    groups = dual_groups(rng, worst_value, rho)
    m = min(v.min() for _, v, _ in groups)  # batch-min: min V over the whole batch (every group's next states)
    for p0, v, eta_star in groups:  # the closed form against a brute-force grid of the objective (numpy)
        grid = np.linspace(v.min() - 1.0, v.max() + 1.0, 20001)
        shift = 0.0 if worst_value == "zero" else m
        objective = (p0 * np.maximum(grid[:, None] - v, 0.0)).sum(1) - (1 - rho) * (grid - shift)
        assert abs(grid[objective.argmin()] - eta_star) < 1e-3
    k = len(groups[0][0])
    # the 3 transitions (s_0, a_0), (s_0, a_1), (s_1, a_0): eta must depend on both inputs
    two_states, two_actions = torch.randn(2, state_dim), torch.tensor([[0, 1, 2], [3, 1, 4]])
    states = two_states[[0, 0, 1]].repeat_interleave(k, 0)
    actions = two_actions[[0, 1, 0]].repeat_interleave(k, 0)
    next_v = torch.tensor(np.concatenate([v for _, v, _ in groups]), dtype=torch.float32)
    weight = torch.tensor(np.concatenate([p0 for p0, _, _ in groups]), dtype=torch.float32)
    net = mod.DualNetwork(state_dim, n_agents, n_actions, 64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    lo, hi = mod.eta_bounds(next_v, GAMMA, rho, worst_value)
    for step in range(1100):  # Adam on a piecewise-linear loss hovers ~lr around the kink: lr steps down
        opt.param_groups[0]["lr"] = 1e-2 if step < 300 else 3e-3 if step < 600 else 1e-3 if step < 900 else 3e-4
        raw = net(states, actions)
        loss = mod.dual_loss(raw.clamp(lo, hi), next_v, rho, worst_value, "linear", weight, raw_eta=raw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # the scripts' Eq. (16)/(29) target for the whole batch (batch-min: m of the batch)
        eta = net(states, actions).clamp(lo, hi).double()
        y = mod.robust_target(t64(reward), next_v.double(), eta, torch.zeros_like(eta), GAMMA, rho, worst_value)
    for g, (p0, v, eta_star) in enumerate(groups):
        rows = slice(g * k, (g + 1) * k)
        assert eta[rows].max() - eta[rows].min() < 1e-4  # one (s, a): one eta (float32 rounding)
        assert eta[g * k].item() == pytest.approx(eta_star, abs=0.1), (g, eta[::k].tolist(), [e for *_, e in groups])
        exact = reward + GAMMA * (
            tv_worst_lp(p0, v, rho) if worst_value == "zero" else tv_worst_lp(np.append(p0, 0.0), np.append(v, m), rho)
        )  # mass may go to m
        assert float(t64(p0) @ y[rows]) == pytest.approx(exact, abs=0.05)
