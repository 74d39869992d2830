"""Learning tests through the real training loops: the cooperative matrix games (``--env matrix``).

Each script runs as a subprocess, exactly as a user runs it, on a game whose answer is known in
closed form: uniform exploration (epsilon 1 throughout), a fixed seed, a budget that converges
(8,000 env steps, ~10 s). The test loads model.pt, evaluates the learned networks on every history
of the game (tests/matrix_report.py: ``Learned``) and compares with a value it computes itself,
never with the script's own target or loss functions:

* VDN, one-step: Q_1(a) + Q_2(b) = the least-squares additive fit of the payoff under uniform
  data; its greedy joint action is therefore not (A, A).
* VDN, rho-contamination, two-step: the first-step values = the least-squares fit of
  gamma (1 - rho) V', V' the learned greedy value of the step-2 state; VDN picks 2A (return 7).
  And with the target never copied, gamma (1 - rho) V' of the *initial* network (theta-, not theta).
* QMIX, two-step: picks 2B, return 8; second-step Q_tot = [[0, 1], [1, 8]] and all 7.
* QTRAN, one-step: Q_jt = the payoff matrix, and the individual greedy actions reach its optimum
  (A, A), return 8.
* TV scripts on the two-step game (all values there are >= 0, unlike the building task):
  - linear dual loss + clamp: for a deterministic transition the TV ball's worst case moves rho of
    mass to the value 0, so y = gamma (1 - rho) V' and eta -> V';
  - squared dual loss, no clamp (the released code): the squared term vanishes at eta = 0 and at
    eta = V'/rho, and the bootstrap (1 - rho) eta - [eta - V']_+ is 0 at both: the first-step
    values go to 0;
  - batch-min (Eq. 27-29): y = gamma ((1 - rho) V' + rho m), m the smallest V' of the batch (a terminal
    next state counts with its value 0; with these payoffs >= 0, m = 0 and the form equals the zero one); the
    test takes the expectation of the batch minimum over the replay's next histories (0) and checks the greedy
    rollout: B, then (B, B), return 8.

Tolerances: each is a few times the spread of the learned value (the uniform data's finite
sample, SGD noise) and well below the gap between the operators: rho = 0.2 moves a first-step
value by gamma rho V' ~ 1.4 (TOL_BOOT 0.25); the batch-min test asserts its own gap. Breaking the
loop on purpose (TD-loss sign flipped, bootstrap from the online network, mixer left out of the
optimiser) fails these tests; see docs/matrix_games.md. 13 training runs, two at a time, ~15 s
of one core each.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from conftest import describe, import_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from matrix_report import GAMMA, RHO, Learned, run_args, run_jobs

# The games, written down again here (independent of envs.py).
PAYOFF = np.array([[8, -12, -12], [-12, 0, 0], [-12, 0, 0]], dtype=float)  # QTRAN paper Table 1a
MATRIX = {"2A": np.full((2, 2), 7.0), "2B": np.array([[0, 1], [1, 8]], dtype=float)}  # QMIX paper Fig. 3
BATCH = 128  # matrix_report.FAST's --batch-size: the batch the batch-min is taken over
# batch-min moves the first-step values by gamma rho (V' - m) from the nominal ones: rho 0.5 on QTRAN
# (V' = 7 and 8, m <= 7) makes that ~0.5 on the B row, twice TOL_BOOT.
RHO_BATCH_MIN = 0.5

TOL_ONE_STEP = 0.6  # VDN one-step: the uniform data's finite sample alone moves the fit by ~0.3
TOL_FIT = 0.35  # second-step tables
TOL_BOOT = 0.25  # first-step values against the operator applied to the learned V'
TOL_BOOT_QMIX = 0.4  # QMIX's mixer settles less tightly (+-0.15 over runs); rho = 0.2 moves these values by ~1.5

RUNS = {  # name -> (script, game, extra flags)
    "vdn_one": ("robust_vdn_rho", "one-step", []),
    "vdn_rho": ("robust_vdn_rho", "two-step", ["--rho", str(RHO)]),
    "vdn_frozen": ("robust_vdn_rho", "two-step", ["--rho", str(RHO), "--target-network-frequency", "1000000000"]),
    "qmix": ("robust_qmix_rho", "two-step", []),
    "qtran_one": ("robust_qtran_rho", "one-step", []),
    # The three TV scripts, one flag combination each (linear + clamp is the default).
    "qmix_tv": ("robust_qmix_tv", "two-step", ["--rho", str(RHO)]),
    "vdn_tv_squared": ("robust_vdn_tv", "two-step", ["--rho", str(RHO), "--dual-loss", "squared", "--no-eta-clamp"]),
    "qtran_tv_batch_min": ("robust_qtran_tv", "two-step", ["--rho", str(RHO_BATCH_MIN), "--worst-value", "batch-min"]),
}
# The (script, game) pairs no learning test above covers: each must still train on the game.
SMOKE = [
    ("robust_qmix_rho", "one-step"),
    ("robust_qtran_rho", "two-step"),
    ("robust_vdn_tv", "one-step"),
    ("robust_qmix_tv", "one-step"),
    ("robust_qtran_tv", "one-step"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file, two at a time: {name: (proc or None, cwd)}. MATRIX_TEST_RUNS=DIR keeps
    the runs in DIR and reuses those already there (runs/<name>/model.pt), e.g. to rerun the checks."""
    cwd = os.environ.get("MATRIX_TEST_RUNS") or str(tmp_path_factory.mktemp("matrix"))
    plan = {name: (script, run_args(game, name, *flags)) for name, (script, game, flags) in RUNS.items()}
    plan.update(
        {
            f"smoke_{script}_{game}": (
                script,
                run_args(game, f"smoke_{script}_{game}", "--total-episodes", "100", "--learning-starts", "16"),
            )
            for script, game in SMOKE
        }
    )
    todo = [name for name in plan if not os.path.isfile(os.path.join(cwd, "runs", name, "model.pt"))]
    procs = dict(zip(todo, run_jobs([(f"algos/{plan[n][0]}.py", plan[n][1], cwd) for n in todo], workers=2)))
    return {name: (procs.get(name), cwd) for name in plan}


@pytest.fixture(scope="module")
def learned(runs):
    cache = {}

    def get(name: str) -> Learned:
        if name not in cache:
            proc, cwd = runs[name]
            assert proc is None or proc.returncode == 0, describe(proc)
            cache[name] = Learned(os.path.join(cwd, "runs", name, "model.pt"))
        return cache[name]

    return get


# ---------------------------------------------------------------------------- closed forms
def additive_fit(target: np.ndarray) -> np.ndarray:
    """Least-squares fit of target[a, b] by u[a] + w[b], every cell weighted equally (uniform data)."""
    A, B = target.shape
    design = np.zeros((A * B, A + B))
    for a in range(A):
        for b in range(B):
            design[a * B + b, a] = design[a * B + b, A + b] = 1.0
    coef, *_ = np.linalg.lstsq(design, target.reshape(-1), rcond=None)
    return coef[:A, None] + coef[None, A:]


def expected_batch_min(values: np.ndarray, probs: np.ndarray, batch: int) -> float:
    """E[min of `batch` iid draws] of a discrete distribution: sum_k v_k P(min = v_k)."""
    order = np.argsort(values)
    v, p = values[order], probs[order]
    tail = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])  # tail[k] = P(V >= v_k)
    return float(np.sum(v * (tail[:-1] ** batch - tail[1:] ** batch)))


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def check_second_step(lrn: Learned, expect: dict[str, np.ndarray], tol: float = TOL_FIT) -> None:
    for matrix, table in expect.items():
        got = lrn.second_step(matrix)
        assert max_err(got, table) < tol, f"{lrn.label}: Q_tot in {matrix}\n{got}\nexpected\n{table}"


def check_first_step(lrn: Learned, target: np.ndarray, fit=additive_fit, tol: float = TOL_BOOT) -> None:
    """First-step Q_tot against `fit` of the target table (rows: agent 1's action)."""
    got, want = lrn.table([0], []), fit(target)
    assert max_err(got, want) < tol, f"{lrn.label}: first-step Q_tot\n{got}\nexpected\n{want}\n(target {target})"


def vdn_second_step() -> dict[str, np.ndarray]:
    return {m: additive_fit(t) for m, t in MATRIX.items()}


# ------------------------------------------------------------------------------------ tests
def test_vdn_one_step_learns_the_additive_least_squares_fit(learned):
    lrn = learned("vdn_one")
    fit = additive_fit(PAYOFF)
    assert np.allclose(fit, PAYOFF.mean(1)[:, None] + PAYOFF.mean(0)[None, :] - PAYOFF.mean())  # the same thing
    got = lrn.table([0], [])
    assert max_err(got, fit) < TOL_ONE_STEP, f"learned Q_1 + Q_2\n{got}\nleast-squares fit\n{fit}"
    ret, actions = lrn.rollout()
    assert actions[0] != (0, 0) and ret == 0.0, (actions, ret)  # the fit's maximum is in {B, C} x {B, C}


def test_vdn_rho_two_step_bootstraps_the_robust_target_and_picks_2a(learned):
    lrn = learned("vdn_rho")
    check_second_step(lrn, vdn_second_step())
    v_next = lrn.next_values_first_step()  # learned V' of the step-2 state each first joint action leads to
    assert max_err(v_next, [[7, 7], [6.5, 6.5]]) < TOL_FIT, v_next  # VDN's 2A: 7, its 2B greedy (B, B): 6.5
    check_first_step(lrn, GAMMA * (1 - RHO) * v_next)
    ret, actions = lrn.rollout()
    assert actions[0][0] == 0 and ret == 7.0, (actions, ret)


def test_bootstrap_comes_from_the_target_network(learned):
    """With the target never copied, theta- stays the initial network: the first-step values fit
    gamma (1 - rho) V' of that network (rebuilt here from the seed), not of the trained one."""
    lrn = learned("vdn_frozen")
    module = import_file("robust_vdn_rho_matrix", "algos/robust_vdn_rho.py")
    torch.manual_seed(lrn.args["seed"])  # the script seeds torch, then builds the agents' networks first
    g = lrn.game
    initial = module.QNetworks(g.n_agents, g.obs_dim, g.n_actions, lrn.args["hidden_dim"], lrn.args["share_params"])
    frozen = Learned.__new__(Learned)
    frozen.__dict__.update(lrn.__dict__, q_network=initial)
    v_frozen, v_trained = frozen.next_values_first_step(), lrn.next_values_first_step()
    check_second_step(lrn, vdn_second_step())  # the terminal step learns as usual
    assert max_err(additive_fit(v_frozen), additive_fit(v_trained)) > 4 * TOL_BOOT, (v_frozen, v_trained)
    check_first_step(lrn, GAMMA * (1 - RHO) * v_frozen)


def test_qmix_two_step_picks_2b_and_fits_the_second_step(learned):
    lrn = learned("qmix")
    check_second_step(lrn, MATRIX)
    v_next = lrn.next_values_first_step()
    assert max_err(v_next, [[7, 7], [8, 8]]) < TOL_FIT, v_next
    check_first_step(lrn, GAMMA * v_next, fit=lambda t: t, tol=TOL_BOOT_QMIX)  # monotonic: represented exactly
    ret, actions = lrn.rollout()
    assert actions == [(1, actions[0][1]), (1, 1)] and ret == 8.0, (actions, ret)


def test_qtran_one_step_q_jt_fits_the_payoff(learned):
    """QTRAN's Q_jt represents any table, so it learns the payoff itself; and QTRAN's claim (Son et al. 2019,
    Table 1) holds in this run: the individual greedy actions, each agent's argmax of its own Q_i, reach the
    payoff's optimum (A, A), the argmax of the learned Q_jt too (the QTRAN condition ties them), and the greedy
    episode returns its payoff, 8. (Not guaranteed in general: L_opt, L_nopt are soft constraints; seed 1 and
    these settings are deterministic on CPU.)"""
    lrn = learned("qtran_one")
    got = lrn.table([0], [])
    assert max_err(got, PAYOFF) < TOL_FIT, f"Q_jt\n{got}"
    optimum = tuple(int(i) for i in np.unravel_index(PAYOFF.argmax(), PAYOFF.shape))
    assert optimum == (0, 0) and PAYOFF[optimum] == 8.0  # the closed form: (A, A), return 8
    ret, actions = lrn.rollout()
    q_i = lrn.agent_q([0], [])
    assert actions == [optimum] and ret == PAYOFF[optimum], f"individual greedy {actions}, return {ret}, Q_i\n{q_i}"
    assert tuple(int(i) for i in np.unravel_index(got.argmax(), got.shape)) == optimum, got


def test_tv_linear_clamped_is_the_rho_discounted_target_on_nonnegative_values(learned):
    """QMIX-TV, default flags: picks 2B as QMIX does, first-step values gamma (1 - rho) V'."""
    lrn = learned("qmix_tv")
    check_second_step(lrn, MATRIX)
    v_next = lrn.next_values_first_step()
    assert max_err(v_next, [[7, 7], [8, 8]]) < TOL_FIT, v_next
    # Worst case over {P: TV(P, delta_V') <= rho}, min V = 0: move rho of mass to 0 -> (1 - rho) V'.
    check_first_step(lrn, GAMMA * (1 - RHO) * v_next, fit=lambda t: t, tol=TOL_BOOT_QMIX)
    eta = np.array([[lrn.eta(0, (a1, a2)) for a2 in range(2)] for a1 in range(2)])
    assert max_err(eta, v_next) < TOL_FIT, f"eta\n{eta}\nV'\n{v_next}"  # the dual optimum: eta = V'
    ret, actions = lrn.rollout()
    assert actions[0][0] == 1 and ret == 8.0, (actions, ret)


def test_tv_squared_unclamped_dual_zeroes_the_bootstrap_on_nonnegative_values(learned):
    lrn = learned("vdn_tv_squared")
    check_second_step(lrn, vdn_second_step())
    v_next = lrn.next_values_first_step()
    assert (v_next > 1).all(), v_next
    # The squared term ([eta - V']_+ - (1 - rho) eta)^2 is the square of minus the bootstrap
    # (1 - rho) eta - [eta - V']_+: minimising it over eta drives the bootstrap to 0 wherever 0 is
    # reachable, i.e. V' >= 0 (roots eta = 0 and eta = V'/rho).
    for v in v_next.reshape(-1):
        for root in (0.0, v / RHO):
            assert abs((1 - RHO) * root - max(root - v, 0.0)) < 1e-9
    eta = np.array([[lrn.eta(0, (a1, a2)) for a2 in range(2)] for a1 in range(2)])
    assert max_err(eta, 0.0) < TOL_BOOT, eta  # gradient descent from eta ~ 0 stays at the root 0
    check_first_step(lrn, np.zeros((2, 2)))


def test_tv_batch_min_is_eq_27_29_with_the_batch_minimum(learned):
    lrn = learned("qtran_tv_batch_min")
    check_second_step(lrn, MATRIX)
    # Next histories of the replay under uniform data, each with its probability: step-1 transitions
    # (half) lead to 2A/2B, step-2 transitions (half) to the terminal state, whose value is 0 (the
    # scripts store V' = 0 for a terminated transition, so the batch minimum sees the terminal state's 0).
    values, probs = [0.0], [0.5]  # the terminal state
    for a1 in range(2):
        for a2 in range(2):
            values.append(lrn.value([0, 1 + a1], [(a1, a2)]))
            probs.append(1 / 8)
    m = expected_batch_min(np.array(values), np.array(probs), BATCH)
    v_next = lrn.next_values_first_step()
    target = GAMMA * ((1 - RHO_BATCH_MIN) * v_next + RHO_BATCH_MIN * m)
    assert (GAMMA * v_next - target)[1].min() > 1.5 * TOL_BOOT, (v_next, m)  # far from the nominal target
    check_first_step(lrn, target, fit=lambda t: t)  # Q_jt represents any table
    # Eq. 27-29's m in closed form: every draw of the batch is a terminated step-2 transition (next state "end",
    # value 0) with probability 1/2, so a batch of 128 holds one with probability 1 - 2^-128, and every other V'
    # (the greedy values of 2A, 2B: ~7, ~8) is larger: m = 0.
    assert min(values[1:]) > 1.0, values
    assert m == pytest.approx(0.0, abs=1e-12), m
    ret, actions = lrn.rollout()
    # The greedy rollout: the first-step targets gamma (1 - rho) V' (m = 0) are 3.47 for 2A and 3.96 for 2B, so
    # agent 1 picks B (2B; agent 2's first action does not matter), then the 2B optimum (B, B): return 8.
    assert actions[0][0] == 1 and actions[1] == (1, 1) and ret == MATRIX["2B"].max(), (actions, ret)


@pytest.mark.parametrize("script,game", SMOKE)
def test_every_script_trains_on_both_games(learned, script, game):
    lrn = learned(f"smoke_{script}_{game}")
    ret, actions = lrn.rollout()
    assert len(actions) == lrn.game.episode_limit and np.isfinite(ret)


def test_unknown_matrix_config_is_one_error_line(tmp_path):
    from conftest import run_py

    proc = run_py("algos/robust_vdn_rho.py", "--env", "matrix", "--train-config", "three-step", cwd=str(tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--train-config" in lines[0] and "one-step, two-step" in lines[0], describe(proc)


def test_matrix_env_interface():
    """The task interface, every joint action's reward, the terminal flags, the observed position."""
    import envs

    for config, n_actions, limit in (("one-step", 3, 1), ("two-step", 2, 2)):
        env = envs.make_env("matrix", config)
        assert (env.n_agents, env.n_actions, env.episode_limit) == (2, n_actions, limit)
        for a1 in range(n_actions):
            for a2 in range(n_actions):
                obs, state, avail = env.reset(123)
                assert obs.shape == (2, env.obs_dim) and state.shape == (env.state_dim,) and avail.all()
                assert state[0] == 1 and (obs == state).all()  # both agents observe where the episode is
                rewards, flags = [], []
                for t in range(limit):
                    obs, state, avail, r, term, trunc, _ = env.step([a1, a2] if t == 0 else [a2, a1])
                    rewards.append(r)
                    flags.append((term, trunc))
                    if config == "two-step" and t == 0:  # agent 1's first action picks 2A / 2B
                        assert env.positions[int(state.argmax())] == ("2A", "2B")[a1]
                assert env.positions[int(state.argmax())] == "end"
                assert flags == [(False, False)] * (limit - 1) + [(True, False)]
                want = [PAYOFF[a1, a2]] if config == "one-step" else [0.0, MATRIX[("2A", "2B")[a1]][a2, a1]]
                assert rewards == want
                with pytest.raises(RuntimeError):
                    env.step([0, 0])
    with pytest.raises(envs.EnvArgError, match="one-step, two-step"):
        envs.make_env("matrix", "three-step")
