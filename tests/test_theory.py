"""Theorem 3 on tiny exact instances: robust value iteration with the scripts' own rho-contamination
and TV targets gives values that lower-bound the value under every sampled model of the set (its optimal
value and the value of the robust greedy policy), when the operator's assumptions hold; without them
(all rewards negative, as in the building task) the paper's form is not pessimistic.

(The paper's Example 1, Appendix B, is arithmetic on the paper's own numbers: it exercises no code of
this repository, so it is not a test here.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import import_file

# ---------------------------------------------------------------------------------------------
# Theorem 3 on a tiny tabular problem
# ---------------------------------------------------------------------------------------------
S, A, GAMMA = 5, 4, 0.8  # state 0 is the fail state when present; A = 4 joint actions (2 agents x 2)


def t64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def make_mdp(seed, fail_state):
    rng = np.random.default_rng(seed)
    p0 = rng.dirichlet(np.ones(S) * 0.7, size=(S, A))
    if fail_state:  # Assumption 1: r = 0 and absorbing in every model; other rewards in [0, 1]
        r = rng.uniform(0.0, 1.0, (S, A))
        r[0], p0[0] = 0.0, np.eye(S)[0]
    else:  # all rewards negative, as in the building task: min V != 0
        r = rng.uniform(-2.0, -1.0, (S, A))
    return rng, r, p0


def value_iteration(r, p, iters=150):
    q = np.zeros((S, A))
    for _ in range(iters):
        q = r + GAMMA * p @ q.max(1)
    return q


def policy_value(r, p, policy):
    """Q^pi under kernel p (exact linear solve)."""
    p_pi = p[np.arange(S), policy]  # (S, S)
    v = np.linalg.solve(np.eye(S) - GAMMA * p_pi, r[np.arange(S), policy])
    return r + GAMMA * p @ v


def robust_value_iteration(backup, r, p0, iters=120):
    """Q <- E_P0[script target(r, V')] for every (s, a), V' = max_a Q over all next states."""
    q = np.zeros((S, A))
    for _ in range(iters):
        v = q.max(1)
        q = np.array([[backup(r[s, a], v, p0[s, a]) for a in range(A)] for s in range(S)])
    return q


def contamination_backup(mod, rho, worst_value):
    def backup(reward, v, p0_row):
        y = mod.robust_target(t64(reward), t64(v), t64(0.0), GAMMA, rho, worst_value)
        return float(t64(p0_row) @ y)

    return backup


def tv_backup(mod, rho, worst_value):
    def backup(reward, v, p0_row):
        values, weight = t64(v), t64(p0_row)
        lo, hi = mod.eta_bounds(values, GAMMA, rho, worst_value)
        cands = torch.cat([values, lo[None], hi[None]]).clamp(lo, hi).unique()
        losses = [mod.dual_loss(torch.full_like(values, c.item()), values, rho, worst_value, "linear", weight) for c in cands]
        eta = cands[int(torch.stack(losses).argmin())].item()
        y = mod.robust_target(t64(reward), values, torch.full_like(values, eta), t64(0.0), GAMMA, rho, worst_value)
        return float(weight @ y)

    return backup


def sample_contamination(rng, p0, rho, fail_state):
    nu = rng.dirichlet(np.ones(S) * 0.2, size=(S, A))
    p = (1 - rho) * p0 + rho * nu
    if fail_state:
        p[0] = p0[0]
    return p


def sample_tv(rng, p0, rho, fail_state):
    """A model with 0.5 * ||P_{s,a} - P0_{s,a}||_1 <= rho for every (s, a) (a point on the segment to a
    random law, or an extreme point moving rho of mass to one state)."""
    p = np.empty_like(p0)
    for s, a in itertools.product(range(S), range(A)):
        if rng.random() < 0.5:
            q = rng.dirichlet(np.ones(S) * 0.3)
        else:
            q = p0[s, a].copy()
            j = rng.integers(S)
            moved = 0.0
            for i in np.argsort(-p0[s, a]):
                if i != j:
                    take = min(q[i], rho - moved)
                    q[i] -= take
                    moved += take
            q[j] += moved
        tv = 0.5 * np.abs(q - p0[s, a]).sum()
        p[s, a] = p0[s, a] + min(1.0, rho / max(tv, 1e-12)) * (q - p0[s, a])
    if fail_state:
        p[0] = p0[0]
    return p


CASES = [  # (script, set sampler, worst_value, fail state?)
    ("robust_vdn_rho", "contamination", "zero", True),
    ("robust_vdn_rho", "contamination", "batch-min", False),
    ("robust_qmix_tv", "tv", "zero", True),
    ("robust_qmix_tv", "tv", "batch-min", False),
]


@pytest.mark.parametrize("name,kind,worst_value,fail_state", CASES)
@pytest.mark.parametrize("seed", range(2))
def test_theorem3_robust_values_lower_bound_every_model_in_the_set(name, kind, worst_value, fail_state, seed):
    mod = import_file(f"{name}_under_test", f"algos/{name}.py")
    rng, r, p0 = make_mdp(seed, fail_state)
    rho = 0.3
    backup = (contamination_backup if kind == "contamination" else tv_backup)(mod, rho, worst_value)
    q_rob = robust_value_iteration(backup, r, p0)
    sampler = sample_contamination if kind == "contamination" else sample_tv
    policy = q_rob.argmax(1)
    gaps = []
    for _ in range(100):
        p = sampler(rng, p0, rho, fail_state)
        q_pi = policy_value(r, p, policy)  # the robust greedy policy run in the test model
        assert (q_rob <= q_pi + 1e-8).all()
        assert (q_pi <= value_iteration(r, p) + 1e-6).all()
        gaps.append((q_pi - q_rob).min())
    assert min(gaps) < 0.2  # the bound is not vacuous: some sampled models come close to it
    assert (q_rob <= value_iteration(r, p0) + 1e-8).all()  # P0 is in the set too


@pytest.mark.parametrize("name,kind", [("robust_vdn_rho", "contamination"), ("robust_qmix_tv", "tv")])
def test_theorem3_fails_for_the_paper_form_when_values_are_negative(name, kind):
    """Without Assumption 1/2 (all rewards negative, as in the building task) the paper's operators
    (worst_value="zero") are not pessimistic: some model in the set does worse than they promise."""
    mod = import_file(f"{name}_under_test", f"algos/{name}.py")
    rng, r, p0 = make_mdp(0, fail_state=False)
    rho = 0.3
    backup = (contamination_backup if kind == "contamination" else tv_backup)(mod, rho, "zero")
    q_zero = robust_value_iteration(backup, r, p0)
    sampler = sample_contamination if kind == "contamination" else sample_tv
    policy = q_zero.argmax(1)
    violations = [(policy_value(r, sampler(rng, p0, rho, False), policy) < q_zero - 1e-6).any() for _ in range(50)]
    assert any(violations)
