"""The training loops of algos/robust_qtran_rho.py (Alg. 4) and algos/robust_qtran_tv.py (Alg. 7), checked update by update.

Each script runs as __main__ in this process (conftest.run_script_in_process) on a tiny budget, with two test-side
taps that only read: the environment is wrapped so that every transition the loop saw is logged (obs, state,
available actions, joint action, reward, terminated) as the environment produced it, and runs.Run is
subclassed so that the objects the loop hands to ``run.track`` are seen (at ``with run:``) and each tracked optimiser's
``step`` is wrapped: just before the step (after the backward and the clip) it records the networks' weights, the (clipped)
gradients, the optimisers' states, the target ``y``, the norm ``grad_norm`` and the minibatches ``b`` / ``dual_b``
the loop drew. Everything a test compares with is then computed
here, from the environment's own log (not the replay buffer's windows) and the recorded weights, by a plain-torch
float64 rewrite of the networks and of Eq. (12)-(17) (docs/qtran.md items 2-13):

* the target: V' = Q_jt(h', a_bar'; theta-), a_bar'_i = argmax over the actions available at h' of the *target*
  agent's Q_i, V' = 0 after a termination; rho: y = r + gamma (1 - terminated) (1 - rho) V' (Eq. 15; batch-min
  adds rho m); TV: y = r + gamma (1 - terminated) ((1 - rho) eta - [eta - V']_+) (Eq. 16, 29) with eta from the
  dual network *after* its step, clamped to Eq. (10)'s range unless --no-eta-clamp;
* L = L_td + L_opt + L_nopt (Eq. 12-13), Q-hat_jt detached in both consistency terms, a_bar at h the per-agent
  argmax over the actions available at h; one backward, one clip of the global norm over agents + Q_jt + V_tot;
* the optimiser steps in closed form: RMSprop (agents) + Adam (QTRAN networks), or one Adam over all
  (--optimizer adam); TV: first the dual step (Eq. 17 linear or squared, the pull-back term, its own clip).

What the tests prove (each for both scripts):

1. ``test_one_update_moves_every_parameter_as_predicted``: one gradient step moves every parameter of the agents,
   Q_jt, V_tot (and the dual network) exactly as predicted, and plausible wrong loops (no L_opt / L_nopt, Q-hat
   not detached, unmasked argmaxes, truncation as termination, no clip, the dual step after the Q step, the other
   optimiser) predict something else.
2. ``test_frozen_target_bootstraps_from_the_initial_weights`` / ``test_copied_target_bootstraps_from_the_copy``:
   with the target never copied every update's target comes from the initial weights (not the online network);
   with a copy after every update, from the weights the copy took.
3. ``test_time_limits_bootstrap``: a time limit (the --episode-steps cap, the task's own time-out) is stored with
   terminated = 0 and its target bootstraps; a termination's target is the reward alone.
4. ``test_greedy_acting_is_masked``, ``test_every_argmax_is_masked``: acting (greedy: the online network's masked
   argmax; exploring: uniform over the available actions), the target argmax and the argmax at h never take an
   unavailable action, on a task whose masks matter (``MaskedTeamGame`` below, which raises, as SMAX does, on an
   unavailable action).
5. ``test_acting_follows_the_history_the_epsilon_schedule_and_the_seeded_draws``: every generator is seeded from
   --seed, the online agents act on the episode's history window with the weights in force, and every action, day
   and minibatch follows from the logged draws of the script's numpy Generator (test_loops_vdn_qmix.DrawLog), the
   masks and the epsilon schedule (epsilon 1 -> 0.05 while learning; TV with --single-coin).

Two runs weight L_opt and L_nopt unequally (--lambda-opt 0.7 --lambda-nopt 1.3), the TV building run clips the
dual at 2 and the Q step at 1, and the TV frozen run's dual network is narrower than the agents (12 vs 16), so a
loop that swaps the two weights, the two clips or the two widths is seen.

The masked task is a test double (monkeypatched into envs.make_env; the scripts run with --env matrix for their
flags, so MATRIX_DEFAULTS apply where a flag is not given); the building runs use the real task. Seeds are chosen
so that each wrong loop differs on the batch drawn (e.g. TV: eta > 0 or V' < 0 somewhere, or the target would
not depend on V'). ~15-20 s in all on a loaded 2-core machine (the first building run imports sustaingym).
"""

from __future__ import annotations

import copy
import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script_in_process
from test_loops_vdn_qmix import DrawLog, expected_epsilon

import envs
import runs as runs_module  # the module the scripts import (conftest put the root on sys.path): their runs.Run

SCRIPTS = {"rho": "algos/robust_qtran_rho.py", "tv": "algos/robust_qtran_tv.py"}
# QTRAN_LOOP_TEST_SCRIPTS="rho=/tmp/copy_rho.py,tv=/tmp/copy_tv.py" runs the tests on other copies of the scripts
# (e.g. with a bug planted on purpose, to see a test fail) without touching algos/.
SCRIPTS.update(item.split("=", 1) for item in os.environ.get("QTRAN_LOOP_TEST_SCRIPTS", "").split(",") if item)
ADAM_BETAS, ADAM_EPS, RMSPROP_ALPHA = (0.9, 0.999), 1e-8, 0.99  # torch's Adam defaults; fused.RMSprop's alpha


# ------------------------------------------------------------------------------------------------
# Tasks and taps
# ------------------------------------------------------------------------------------------------
class MaskedTeamGame:
    """A tiny cooperative task whose action masks matter: 3 agents, 5 actions, each action available with
    probability 1/2 at every step (at least one per agent), real-valued observations and rewards. Episodes end
    three ways: a termination (the state's first coordinate crosses 1, ~1 step in 6), the task's own time-out
    (terminated False, truncated True) after 3 steps on days divisible by 3 and after EPISODE_LIMIT steps
    otherwise. Like SMAX, step() raises on an unavailable action."""

    n_agents, n_actions, obs_dim, state_dim, episode_limit = 3, 5, 4, 6, 6

    def reset(self, day):
        self.rng, self.t, self.day = np.random.default_rng(1000 + int(day)), 0, int(day)
        self.state = self.rng.normal(size=self.state_dim).astype(np.float32) * 0.5
        self.avail = self._mask()
        return self._obs(), self.state.copy(), self.avail.copy()

    def _mask(self):
        m = self.rng.random((self.n_agents, self.n_actions)) < 0.5
        m[np.arange(self.n_agents), self.rng.integers(0, self.n_actions, self.n_agents)] = True
        return m

    def _obs(self):
        idx = np.array([[i, i + 1, i + 2, 5] for i in range(self.n_agents)])
        return self.state[idx] + 0.1 * np.arange(self.n_agents, dtype=np.float32)[:, None]

    def step(self, actions):
        actions = np.asarray(actions).reshape(self.n_agents)
        for i, a in enumerate(actions):
            if not self.avail[i, int(a)]:
                raise ValueError(f"agent {i} cannot perform action {int(a)} (unavailable)")
        reward = float(np.dot(self.state[:3], actions - 2.0) * 0.5 + 1.0)
        self.state = (0.8 * self.state + 0.6 * self.rng.normal(size=self.state_dim)).astype(np.float32)
        self.state[1:4] += 0.1 * actions
        self.t += 1
        terminated = bool(self.state[0] > 1.0)
        limit = 3 if self.day % 3 == 0 else self.episode_limit
        truncated = not terminated and self.t >= limit
        self.avail = self._mask()
        return self._obs(), self.state.copy(), self.avail.copy(), reward, terminated, truncated, {}


class Recorder:
    """Wraps a task and logs every transition as the task produced it: one dict per env step, in order."""

    def __init__(self, env):
        self.env, self.log, self.episode, self.days = env, [], -1, []
        for name in ("n_agents", "n_actions", "obs_dim", "state_dim", "episode_limit"):
            setattr(self, name, getattr(env, name))

    def reset(self, day):
        self.days.append(day)
        self.obs, self.state, self.avail = self.env.reset(day)
        self.t, self.episode = 0, self.episode + 1
        return self.obs, self.state, self.avail

    def step(self, actions):
        out = self.env.step(actions)
        next_obs, next_state, next_avail, reward, terminated, truncated, _ = out
        self.log.append(
            {
                "episode": self.episode,
                "t": self.t,
                "obs": self.obs.copy(),
                "state": self.state.copy(),
                "avail": self.avail.copy(),
                "actions": np.array(actions, dtype=np.int64),
                "reward": reward,
                "next_obs": next_obs.copy(),
                "next_state": next_state.copy(),
                "next_avail": next_avail.copy(),
                "terminated": bool(terminated),
                "env_truncated": bool(truncated),
            }
        )
        self.obs, self.state, self.avail, self.t = next_obs, next_state, next_avail, self.t + 1
        return out


def _weights(obj):
    return {k: v.detach().clone() for k, v in obj.state_dict().items()}


def script_globals():
    """The namespace of the script run as __main__ (its loop runs at module level): the nearest such frame."""
    frame = sys._getframe(1)
    while frame.f_globals.get("__name__") != "__main__":
        frame = frame.f_back
    return frame.f_globals


class Spy:
    """The records of one run, taken through runs.Run (at ``with run:``, the objects the loop handed to run.track) and
    the tracked optimisers' step methods (wrapped, read only): ``init`` (weights when the loop starts), ``calls`` (one
    record just before the first Q optimiser's step of each update, and TV one just before each dual step: the weights,
    the (clipped) gradients, the optimisers' states, the loop's target ``y``, global norm ``grad_norm`` / dual loss
    ``d_loss`` and its minibatches ``b`` / ``dual_b``, read from the script's namespace), ``steps`` (every optimiser step
    in order: "dual", "q0", "q1"), ``acting`` (inputs and output of every q_network.greedy_q call: the acting windows
    and Q-values, and the loop's epsilon then)."""

    def __init__(self):
        self.init, self.calls, self.steps, self.acting = None, [], [], []

    def record(self, state, name):
        g = script_globals()
        rec = {
            "step": g["global_step"],
            "kind": "dual" if name == "dual" else "q",
            "idx": np.array(g["b"].idx) if "b" in g else np.array([], dtype=np.int64),  # no Q minibatch before the first
            "dual_idx": np.array(g["dual_b"].idx) if "dual_b" in g else np.array([], dtype=np.int64),
        }
        names = ("d_loss",) if name == "dual" else ("y", "grad_norm")
        rec["values"] = {{"y": "target"}.get(k, k): g[k].detach().clone() for k in names}
        rec["weights"] = {n: _weights(o) for n, o in state.items() if isinstance(o, torch.nn.Module)}
        rec["grads"] = {
            n: {k: None if p.grad is None else p.grad.detach().clone() for k, p in o.named_parameters()}
            for n, o in state.items()
            if isinstance(o, torch.nn.Module)
        }
        opts = list(state["optimizers"]) + ([state["dual_optimizer"]] if "dual_optimizer" in state else [])
        rec["opt_states"] = [copy.deepcopy(o.state_dict()["state"]) for o in opts]
        self.calls.append(rec)

    def run_class(self):
        spy = self

        class SpyRun(runs_module.Run):
            def __enter__(self):  # the loop starts: every object handed to run.track is known
                super().__enter__()
                state = self.state
                spy.init = {n: _weights(o) for n, o in state.items() if isinstance(o, torch.nn.Module)}
                greedy_q = state["q_network"].greedy_q

                def acting(obs_w, prev_w, *args, **kwargs):  # the online network's no-grad forward: acting only
                    out = greedy_q(obs_w, prev_w, *args, **kwargs)
                    epsilon = sys._getframe(1).f_globals.get("epsilon")  # the loop's epsilon of this step (read only)
                    spy.acting.append((obs_w.clone(), prev_w.clone(), out.clone(), epsilon))
                    return out

                state["q_network"].greedy_q = acting
                optimizers = {f"q{i}": o for i, o in enumerate(state["optimizers"])}
                if "dual_optimizer" in state:
                    optimizers["dual"] = state["dual_optimizer"]
                for name, opt in optimizers.items():
                    opt.step = self.spied_step(name, opt.step)
                return self

            def spied_step(self, name, step):
                def spied(*args, **kwargs):  # just before the optimiser's step: after the backward and the clip
                    spy.steps.append(name)
                    if name in ("q0", "dual"):
                        spy.record(self.state, name)
                    return step(*args, **kwargs)

                return spied

        return SpyRun


class Run:
    """One in-process run: the script's final namespace ``g``, the Spy, the task's log."""

    def __init__(self, kind, flags, cwd, task="masked"):
        self.kind, self.spy = kind, Spy()
        inner = MaskedTeamGame() if task == "masked" else None
        holder, self.draws = {}, []
        real_make_env, real_default_rng = envs.make_env, np.random.default_rng

        def make_env(env_id, config=None, seed=0):
            holder["seeds"] = (seed, torch.initial_seed(), random.getstate(), np.random.get_state())
            holder["env"] = Recorder(inner if inner is not None else real_make_env(env_id, config, seed))
            return holder["env"]

        def default_rng(seed=None):  # the script's own Generator (days, exploration, minibatches), its draws logged
            if sys._getframe(1).f_globals.get("__name__") != "__main__":
                return real_default_rng(seed)
            holder["rng_seed"] = seed
            return DrawLog(seed, self.draws)

        env_flag = ["--env", "matrix", "--train-config", "two-step"] if task == "masked" else ["--env", "building"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(envs, "make_env", make_env)
            mp.setattr(runs_module, "Run", self.spy.run_class())
            mp.setattr(np.random, "default_rng", default_rng)
            self.g = run_script_in_process(
                SCRIPTS[kind],
                [*env_flag, "--torch-threads", 1, "--checkpoint-every", 0, "--log-every", 1000, "--run-name", "r", *flags],
                cwd,
            )
        self.args, self.log, self.days = self.g["args"], holder["env"].log, holder["env"].days
        self.seeds, self.rng_seed = holder["seeds"], holder.get("rng_seed", "not made")
        rb = self.g["rb"]
        assert rb.size == len(self.log) < rb.capacity  # no wrap: slot j holds the j-th transition of the log
        self.updates = [c for c in self.spy.calls if c["kind"] == "q"]
        self.duals = [c for c in self.spy.calls if c["kind"] == "dual"]
        # each training step: k dual steps (TV), then k times every Q optimiser once (RMSprop agents + Adam Q_jt/V_tot,
        # or one Adam); k = 1, or 4 with --update-schedule released
        k = 4 if getattr(self.args, "update_schedule", "paper") == "released" else 1
        cycle = ["dual"] * k * (kind == "tv") + [f"q{i}" for i in range(len(self.g["optimizers"]))] * k
        self.n_updates = len(self.updates)
        assert self.spy.steps == cycle * (self.n_updates // k) and self.n_updates % k == 0, self.spy.steps

    def final(self):
        return {n: _weights(self.g[n]) for n in self.spy.init}


# ------------------------------------------------------------------------------------------------
# The networks, rewritten in plain torch from the documented layouts (docs/qtran.md items 2-4, 9)
# ------------------------------------------------------------------------------------------------
def leaf(weights, requires_grad=True):
    return {k: v.double().clone().requires_grad_(requires_grad) for k, v in weights.items()}


def agents_forward(w, obs_w, prev_w, n_actions):
    """Per-agent DRQN: fc1 on [obs, onehot(previous action)] -> ReLU -> LSTM from a zero state over the window ->
    last output f_i -> ReLU -> fc_out. obs_w (W, B, N, O), prev_w (W, B, N) -> Q (B, N, A), f (B, N, H)."""
    W, B, N = prev_w.shape
    qs, fs = [], []
    for k in range(N):
        onehot = F.one_hot(prev_w[:, :, k], n_actions).double()
        x = obs_w[:, :, k] @ w["drqn.fc1.weight_obs"][k].T + onehot @ w["drqn.fc1.weight_onehot"][k]
        x = F.relu(x + w["drqn.fc1.bias"][k])
        H = x.shape[-1]
        h, c = x.new_zeros(B, H), x.new_zeros(B, H)
        for s in range(W):  # torch's LSTM gate order: input, forget, cell, output
            gates = (
                x[s] @ w["drqn.lstm.weight_ih_l0"][k].T
                + w["drqn.lstm.bias_ih_l0"][k]
                + h @ w["drqn.lstm.weight_hh_l0"][k].T
                + w["drqn.lstm.bias_hh_l0"][k]
            )
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        qs.append(F.relu(h) @ w["drqn.fc_out.weight"][k].T + w["drqn.fc_out.bias"][k])
        fs.append(h)
    return torch.stack(qs, 1), torch.stack(fs, 1)


def joint_onehot(actions, n_actions):
    return F.one_hot(actions, n_actions).double().flatten(1)  # (B, N * A): onehot(a_1) .. onehot(a_N)


def q_jt(w, f_sum, actions, n_actions):
    a = F.relu(F.linear(joint_onehot(actions, n_actions), w["action_fc.weight"], w["action_fc.bias"]))
    x = F.relu(F.linear(torch.cat([a, f_sum], -1), w["q_fc.weight"], w["q_fc.bias"]))
    return F.linear(x, w["q_out.weight"], w["q_out.bias"]).squeeze(-1)


def v_tot(w, state, f_sum):
    x = torch.cat(
        [
            F.relu(F.linear(state, w["v_state.weight"], w["v_state.bias"])),
            F.relu(F.linear(f_sum, w["v_feat.weight"], w["v_feat.bias"])),
        ],
        -1,
    )
    return F.linear(F.relu(F.linear(x, w["v_fc.weight"], w["v_fc.bias"])), w["v_out.weight"], w["v_out.bias"]).squeeze(-1)


def dual_forward(w, state, actions, n_actions):
    x = torch.cat(
        [
            F.relu(F.linear(state, w["state_fc.weight"], w["state_fc.bias"])),
            F.relu(F.linear(joint_onehot(actions, n_actions), w["action_fc.weight"], w["action_fc.bias"])),
        ],
        -1,
    )
    return F.linear(F.relu(F.linear(x, w["fc.weight"], w["fc.bias"])), w["out.weight"], w["out.bias"]).squeeze(-1)


def masked_argmax(q, avail):
    return q.masked_fill(~avail, -float("inf")).argmax(-1)


# ------------------------------------------------------------------------------------------------
# The minibatch from the task's log, the update predicted
# ------------------------------------------------------------------------------------------------
def batch_from_log(log, idx, window):
    """Windows of the transitions idx rebuilt from the log (the last `window` (obs, previous action) pairs,
    zero obs before the episode's start, previous action 0 at t = 0), and their fields."""
    episodes = {}
    for tr in log:
        episodes.setdefault(tr["episode"], []).append(tr)

    def obs_at(ep, t, tau):  # the observation at step tau of an episode whose transition t is sampled
        return np.zeros_like(ep[0]["obs"]) if tau < 0 else ep[tau]["obs"] if tau <= t else ep[t]["next_obs"]

    def prev_at(ep, tau):  # the previous action at step tau
        return np.zeros_like(ep[0]["actions"]) if tau < 1 else ep[tau - 1]["actions"]

    obs_w, prev_w, nobs_w, nprev_w = [], [], [], []
    for j in idx:
        ep, t = episodes[log[j]["episode"]], log[j]["t"]
        assert ep[t] is log[j]
        obs_w.append([obs_at(ep, t, tau) for tau in range(t - window + 1, t + 1)])
        prev_w.append([prev_at(ep, tau) for tau in range(t - window + 1, t + 1)])
        nobs_w.append([obs_at(ep, t, tau) for tau in range(t - window + 2, t + 2)])
        nprev_w.append([prev_at(ep, tau) for tau in range(t - window + 2, t + 2)])

    def stack(key, dtype):
        return torch.tensor(np.stack([log[j][key] for j in idx]), dtype=dtype)

    def windows(x, dtype):
        return torch.tensor(np.array(x), dtype=dtype).transpose(0, 1)  # (W, B, ...)

    return {
        "obs_w": windows(obs_w, torch.float64),
        "prev_w": windows(prev_w, torch.int64),
        "next_obs_w": windows(nobs_w, torch.float64),
        "next_prev_w": windows(nprev_w, torch.int64),
        "state": stack("state", torch.float64),
        "actions": stack("actions", torch.int64),
        "reward": torch.tensor([float(log[j]["reward"]) for j in idx], dtype=torch.float64),
        "terminated": torch.tensor([float(log[j]["terminated"]) for j in idx], dtype=torch.float64),
        "avail": stack("avail", torch.bool),
        "next_avail": stack("next_avail", torch.bool),
    }


def clip_(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (global norm + 1e-6)); returns the norm."""
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    if max_norm > 0:
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for k in grads:
            grads[k] = grads[k] * coef
    return float(norm)


def adam_step(g, state, lr):
    """torch.optim.Adam (no weight decay, no amsgrad) from state (None = first step) -> the change of the parameter."""
    (b1, b2), m, v, t = ADAM_BETAS, torch.zeros_like(g), torch.zeros_like(g), 0
    if state:
        m, v, t = state["exp_avg"].double(), state["exp_avg_sq"].double(), int(state["step"])
    t += 1
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return -lr / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + ADAM_EPS)


def rmsprop_step(g, state, lr, eps):
    """fused.RMSprop = torch.optim.RMSprop without momentum: v <- alpha v + (1 - alpha) g^2, dp = -lr g / (sqrt(v) + eps)."""
    v = state["square_avg"].double() if state else torch.zeros_like(g)
    v = RMSPROP_ALPHA * v + (1 - RMSPROP_ALPHA) * g * g
    return -lr * g / (v.sqrt() + eps)


def position(run, update) -> int:
    """Which Q step of the run this record is (by identity: records of one training step can be equal field by field)."""
    return next(k for k, u in enumerate(run.updates) if u is update)


class Prediction:
    """One update of the loop computed here. ``wrong``: a set of deliberately wrong variants of the loop
    (no_consistency, no_detach, unmasked_h, unmasked_target, truncation_terminal, no_clip, no_dual_clip,
    dual_after, clamp_toggle, other_optimizer, online_bootstrap) to show that the check can tell them apart."""

    def __init__(self, run, update, target_agents, target_qtran, wrong=frozenset(), dual_after=None):
        a, A = run.args, run.g["A"]
        self.wrong = wrong
        pre = update["weights"]  # agents, Q_jt, V_tot before this Q step (TV: the dual already stepped)
        if "online_bootstrap" in wrong:
            target_agents, target_qtran = pre["q_network"], pre["qtran"]
        b = batch_from_log(run.log, update["idx"], a.window)
        self.batch = b
        self.next_v = self.target_value(b, target_agents, target_qtran, A, "unmasked_target" in wrong)
        if "truncation_terminal" in wrong:
            ends = torch.tensor(
                [
                    float(
                        run.log[j]["terminated"]
                        or run.log[j]["env_truncated"]
                        or run.log[j]["t"] == run.g["episode_steps"] - 1
                    )
                    for j in update["idx"]
                ],
                dtype=torch.float64,
            )
            b["terminated"] = ends
            self.next_v = torch.where(ends > 0, 0.0, self.next_v)
        gamma, rho = a.gamma, a.rho
        self.clamp = getattr(a, "eta_clamp", False) != ("clamp_toggle" in wrong)
        if run.kind == "tv":
            dual = run.duals[position(run, update)]
            self.dual_grads, self.dual_norm = self.dual_gradients(run, dual, target_agents, target_qtran)
            if dual_after is None:  # the dual network after its step (first step: from the closed form)
                delta = self.dual_step_from(run, dual, self.dual_grads)
                dual_after = {k: v.double() + delta[k] for k, v in dual["weights"]["dual_network"].items()}
            if "dual_after" in wrong:  # eta from the dual network before its step
                dual_after = {k: v.double() for k, v in dual["weights"]["dual_network"].items()}
            with torch.no_grad():
                eta = dual_forward(leaf(dual_after, False), b["state"], b["actions"], A)
                lo, hi = self.eta_bounds(self.next_v, gamma, rho, a.worst_value)
                eta = eta.clamp(lo, hi) if self.clamp else eta
            self.eta = eta
            m = self.next_v.min() if a.worst_value == "batch-min" else 0.0
            bootstrap = m + (1 - rho) * (eta - m) - F.relu(eta - self.next_v)
        else:
            bootstrap = (1 - rho) * self.next_v + (rho * self.next_v.min() if a.worst_value == "batch-min" else 0.0)
        self.y = b["reward"] + gamma * (1 - b["terminated"]) * bootstrap

        wq, wj = leaf(pre["q_network"]), leaf(pre["qtran"])
        q, f = agents_forward(wq, b["obs_w"], b["prev_w"], A)
        f_sum = f.sum(1)
        q_taken_sum = q.gather(-1, b["actions"][..., None]).squeeze(-1).sum(-1)
        q_joint = q_jt(wj, f_sum, b["actions"], A)
        td = ((q_joint - self.y) ** 2).mean()
        a_bar = q.detach().argmax(-1) if "unmasked_h" in wrong else masked_argmax(q.detach(), b["avail"])
        self.a_bar = a_bar
        q_greedy_sum = q.gather(-1, a_bar[..., None]).squeeze(-1).sum(-1)
        hat_greedy = q_jt(wj, f_sum, a_bar, A)
        hat_taken = q_joint
        if "no_detach" not in wrong:
            hat_greedy, hat_taken = hat_greedy.detach(), hat_taken.detach()
        v = v_tot(wj, b["state"], f_sum)
        opt = ((q_greedy_sum - hat_greedy + v) ** 2).mean()
        nopt = (torch.clamp(q_taken_sum - hat_taken + v, max=0.0) ** 2).mean()
        self.losses = {"td": float(td.detach()), "opt": float(opt.detach()), "nopt": float(nopt.detach())}
        loss = td if "no_consistency" in wrong else td + a.lambda_opt * opt + a.lambda_nopt * nopt
        names = [("q_network", k) for k in wq] + [("qtran", k) for k in wj]
        grads = torch.autograd.grad(loss, [wq[k] for k in wq] + [wj[k] for k in wj], allow_unused=True)
        self.grads = {
            nk: (torch.zeros_like(w[nk[1]]) if gr is None else gr)
            for nk, gr, w in zip(names, grads, [wq] * len(wq) + [wj] * len(wj))
        }
        self.norm = clip_(self.grads, 0.0 if "no_clip" in wrong else a.max_grad_norm)

    @staticmethod
    def target_value(b, target_agents, target_qtran, A, unmasked=False):
        """V' = Q_jt(h', a_bar'; theta-), a_bar'_i the target agent's argmax over the actions available at h'; 0 after
        a termination (its next state is terminal)."""
        with torch.no_grad():
            q_next, f_next = agents_forward(leaf(target_agents, False), b["next_obs_w"], b["next_prev_w"], A)
            a_next = q_next.argmax(-1) if unmasked else masked_argmax(q_next, b["next_avail"])
            v = q_jt(leaf(target_qtran, False), f_next.sum(1), a_next, A)
        return torch.where(b["terminated"] > 0, 0.0, v)

    @staticmethod
    def eta_bounds(next_v, gamma, rho, worst_value):
        lo = float(next_v.min()) if worst_value == "batch-min" else 0.0
        return lo, lo + (2.0 / (rho * (1.0 - gamma)) if rho > 0 else float("inf"))

    def dual_gradients(self, run, dual, target_agents, target_qtran):
        """Eq. (17) on the dual batch: mean over live samples of [eta - V']_+ - (1 - rho) (eta - m) (or its square),
        + (raw eta - clamped eta)^2, eta clamped to Eq. (10)'s range; its gradients after the dual clip, the norm."""
        a, A = run.args, run.g["A"]
        b = batch_from_log(run.log, dual["dual_idx"], a.window)
        v_next = self.target_value(b, target_agents, target_qtran, A, "unmasked_target" in self.wrong)
        w = leaf(dual["weights"]["dual_network"])
        raw = dual_forward(w, b["state"], b["actions"], A)
        eta = raw.clamp(*self.eta_bounds(v_next, a.gamma, a.rho, a.worst_value)) if self.clamp else raw
        m = v_next.min() if a.worst_value == "batch-min" else 0.0
        term = F.relu(eta - v_next) - (1 - a.rho) * (eta - m)
        term = term**2 if a.dual_loss == "squared" else term
        term = term + (raw - eta.detach()) ** 2
        live = 1 - b["terminated"]
        loss = (live * term).sum() / live.sum()
        self.dual_loss = float(loss.detach())
        grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
        norm = clip_(grads, 0.0 if "no_dual_clip" in self.wrong else a.dual_max_grad_norm)
        return grads, norm

    @staticmethod
    def dual_step_from(run, dual, grads):
        """The dual network's Adam step (lr --dual-learning-rate) from its state before the step."""
        state, keys = dual["opt_states"][-1], [k for k, _ in run.g["dual_network"].named_parameters()]
        return {k: adam_step(grads[k].double(), state.get(keys.index(k)), run.args.dual_learning_rate) for k in grads}

    def step_from(self, run, update, grads):
        """The change of every agent / Q_jt / V_tot parameter that gradients ``grads`` make: RMSprop (agents) + Adam
        (Q_jt, V_tot) as in the paper, or one Adam over all (released); from the optimisers' states before the step
        (empty at the first step: the first-step closed forms)."""
        a = run.args
        kind = a.optimizer
        if "other_optimizer" in self.wrong:
            kind = "adam" if kind == "rmsprop" else "rmsprop"
        q_keys = [k for k, _ in run.g["q_network"].named_parameters()]
        j_keys = [k for k, _ in run.g["qtran"].named_parameters()]
        states = update["opt_states"] if kind == a.optimizer else [{}, {}]  # the other optimiser: from scratch
        delta = {}
        for (net, key), g in grads.items():
            g = g.double()
            if kind == "rmsprop" and net == "q_network":
                delta[net, key] = rmsprop_step(g, states[0].get(q_keys.index(key)), a.learning_rate, a.rmsprop_eps)
            elif kind == "rmsprop":
                delta[net, key] = adam_step(g, states[1].get(j_keys.index(key)), a.qtran_learning_rate)
            else:
                pos = q_keys.index(key) if net == "q_network" else len(q_keys) + j_keys.index(key)
                delta[net, key] = adam_step(g, states[0].get(pos), a.qtran_learning_rate)
        return delta


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------
def y_error(update, pred) -> float:
    """The loop's target y against the predicted one, in units of the tolerance 1e-5 (1 + |y|): < 1 is a match."""
    y = update["values"]["target"].double()
    return float(((y - pred.y).abs() / (1e-5 * (1 + pred.y.abs()))).max())


def worst_rel(got: dict, want: dict) -> float:
    """max over tensors of max |got - want| / (max |want| + 1e-12): 0 for an exact match."""
    return max(float((got[k].double() - want[k]).abs().max() / (want[k].abs().max() + 1e-12)) for k in want)


def recorded_grads(update):
    return {(n, k): g for n in ("q_network", "qtran") for k, g in update["grads"][n].items()}


def actual_delta(before, after):
    return {(n, k): after[n][k].double() - before[n][k].double() for n in ("q_network", "qtran") for k in before[n]}


def step_error(got: dict, want: dict) -> float:
    """Largest deviation of the parameter changes from the closed-form step in units of the tolerance
    1e-3 |predicted| + 1e-7 (a float32 weight near 1 is exact to ~1e-7): < 1 is a match. The step is applied to the
    loop's own (recorded) gradients, themselves checked against the prediction to 1e-4 of their scale: Adam's
    first step, -lr g / (|g| + 1e-8), would turn that rounding on an entry of 1e-8 into a visible change."""
    assert got.keys() == want.keys()
    return max(float(((got[k] - want[k]).abs() / (1e-3 * want[k].abs() + 1e-7)).max()) for k in want)


FAST = ["--window", 3, "--hidden-dim", 16, "--gamma", 0.9, "--buffer-size", 1000]


def masked_flags(kind, n_updates, every=40, batch=32):
    """MaskedTeamGame, n_updates gradient steps at env steps every, 2 every, ... (learning starts just before the
    first), a 5-step cap on the task's 6-step episodes, the target never copied."""
    return [
        *FAST,
        "--batch-size",
        batch,
        "--train-frequency",
        every,
        "--learning-starts",
        every - 1,
        "--total-steps",
        n_updates * every,
        "--total-episodes",
        10_000,
        "--target-network-frequency",
        10**9,
        "--episode-steps",
        5,
        *(["--rho", 0.3] if kind == "rho" else ["--rho", 0.2, "--dual-hidden-dim", 16]),
    ]


BUILDING = [
    "--window",
    4,
    "--hidden-dim",
    16,
    "--gamma",
    0.9,
    "--batch-size",
    16,
    "--train-frequency",
    16,
    "--learning-starts",
    15,
    "--total-steps",
    16,
    "--episode-steps",
    6,
    "--buffer-size",
    200,
    "--target-network-frequency",
    10**9,
]  # one update at env step 16, three 6-step days (cap: a time limit)
LAMBDAS = ["--lambda-opt", 0.7, "--lambda-nopt", 1.3]  # unequal weights of L_opt and L_nopt: a swap of the two shows
# epsilon 1 -> 0.05 over 80 of the 120 env steps; learning from step 41 (a multiple of --train-frequency: a loop
# that starts at >= learning_starts updates at 40 too)
EXPLORE = ["--start-e", 1, "--end-e", 0.05, "--exploration-steps", 80, "--learning-starts", 40]
RUNS = {  # name -> (script, task, flags). Seeds where the target depends on V' (TV: eta > 0 or V' < 0 on the batch).
    # One update each: the paper's configuration on the building task, the released one and batch-min on the masked task.
    "rho_building_paper": ("rho", "building", [*BUILDING, "--rho", 0.3]),
    "rho_masked_released": (
        "rho",
        "masked",
        [*masked_flags("rho", 1), "--optimizer", "adam", "--single-coin", "--max-grad-norm", 0.05],
    ),
    "rho_masked_batchmin_noclip": (
        "rho",
        "masked",
        [*masked_flags("rho", 1), "--worst-value", "batch-min", "--max-grad-norm", 0, *LAMBDAS],
    ),
    # batch-min twice each: m = 0 (terminated samples in the batch, V' = 0 there, every other V' > 0) and m < 0.
    "rho_masked_batchmin_m_negative": (
        "rho",
        "masked",
        [*masked_flags("rho", 1), "--worst-value", "batch-min", "--max-grad-norm", 1.0, "--seed", 8],
    ),
    "tv_building_paper": ("tv", "building", [*BUILDING, "--dual-hidden-dim", 16, "--seed", 6, "--dual-max-grad-norm", 2.0]),
    "tv_masked_paper": ("tv", "masked", [*masked_flags("tv", 1), "--seed", 2, *LAMBDAS]),
    "tv_masked_released": (
        "tv",
        "masked",
        [
            *masked_flags("tv", 1),
            "--optimizer",
            "adam",
            "--dual-loss",
            "squared",
            "--no-eta-clamp",
            "--single-coin",
            "--seed",
            4,
        ],
    ),
    "tv_masked_batchmin": ("tv", "masked", [*masked_flags("tv", 1), "--worst-value", "batch-min", "--seed", 8]),
    "tv_masked_batchmin_m_zero": ("tv", "masked", [*masked_flags("tv", 1), "--worst-value", "batch-min", "--seed", 7]),
    # Three updates: the target never copied / copied after every update (--target-network-frequency = the update period).
    "rho_frozen": ("rho", "masked", masked_flags("rho", 3)),
    "tv_frozen": ("tv", "masked", [*masked_flags("tv", 3), "--seed", 2, "--dual-hidden-dim", 12]),  # dual narrower than agents
    "rho_copied": ("rho", "masked", [*masked_flags("rho", 3), "--target-network-frequency", 40]),
    "tv_copied": ("tv", "masked", [*masked_flags("tv", 3), "--target-network-frequency", 40, "--seed", 2]),
    # Greedy acting (epsilon 0) while learning: three updates, the target never copied (so theta != theta-).
    "rho_greedy": ("rho", "masked", [*masked_flags("rho", 3), "--start-e", 0, "--end-e", 0]),
    "tv_greedy": ("tv", "masked", [*masked_flags("tv", 3), "--start-e", 0, "--end-e", 0, "--seed", 2]),
    # Epsilon-greedy while learning (EXPLORE; TV: one coin for all agents), updates at 80 and 120.
    "rho_explore": ("rho", "masked", [*masked_flags("rho", 3), *EXPLORE]),
    "tv_explore": ("tv", "masked", [*masked_flags("tv", 3), *EXPLORE, "--single-coin", "--seed", 2]),
    # --update-schedule released: one training step at env step 40 (train frequency 10, x 4): 4 dual then 4 Q steps.
    "tv_schedule_released": (
        "tv",
        "masked",
        [
            *masked_flags("tv", 4, every=10),
            *["--update-schedule", "released", "--optimizer", "adam", "--dual-loss", "squared", "--no-eta-clamp"],
            *["--single-coin", "--seed", 2],
        ],
    ),
}
ONE_UPDATE = [n for n in RUNS if n.split("_")[1] in ("building", "masked")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each named run once per module: name -> Run."""
    cache = {}

    def get(name):
        if name not in cache:
            kind, task, flags = RUNS[name]
            cache[name] = Run(kind, flags, str(tmp_path_factory.mktemp(name)), task)
        return cache[name]

    return get


def check_update(run, update, pred, after=None, tag="", dual=True):
    """The loop's recorded target, global gradient norm and (clipped) gradients of this update = the prediction;
    TV: the dual gradients too; with ``after`` (the weights after the step), every parameter's change as well."""
    assert y_error(update, pred) < 1, f"{tag}: target y\n{update['values']['target']}\npredicted\n{pred.y}"
    assert float(update["values"]["grad_norm"]) == pytest.approx(pred.norm, rel=1e-5), tag
    err = worst_rel(recorded_grads(update), pred.grads)
    assert err < 1e-4, f"{tag}: gradients off by {err:.2e} of their scale"
    if after is not None:
        err = step_error(actual_delta(update["weights"], after), pred.step_from(run, update, recorded_grads(update)))
        assert err < 1, f"{tag}: parameter changes off by {err:.2f} tolerances"
    if run.kind == "tv" and dual:  # the dual step paired with this update (one dual step per Q step)
        dual = run.duals[position(run, update)]
        err = worst_rel(dual["grads"]["dual_network"], pred.dual_grads)
        assert err < 1e-4, f"{tag}: dual gradients off by {err:.2e}"
        before, stepped = dual["weights"]["dual_network"], update["weights"]["dual_network"]
        err = step_error(
            {k: stepped[k].double() - before[k].double() for k in before},
            pred.dual_step_from(run, dual, dual["grads"]["dual_network"]),
        )
        assert err < 1, f"{tag}: dual parameter changes off by {err:.2f} tolerances"


def mismatch(run, update, pred, after):
    """How far a (wrong) prediction is from what the loop did, in units of check_update's tolerances (< 1: a match):
    the largest of the errors of y, of the gradients (1e-4 relative), of the parameter changes (after: the weights
    after this update) and, TV, of the dual gradients."""
    errs = [
        y_error(update, pred),
        worst_rel(recorded_grads(update), pred.grads) / 1e-4,
        step_error(actual_delta(update["weights"], after), pred.step_from(run, update, recorded_grads(update))),
    ]
    if run.kind == "tv":
        errs.append(worst_rel(run.duals[position(run, update)]["grads"]["dual_network"], pred.dual_grads) / 1e-4)
    return max(errs)


def wrong_versions(run, name):
    """The wrong loops that differ from the right one on this run (e.g. masks only matter on the masked task)."""
    wrong = ["no_consistency", "no_detach", "other_optimizer", "truncation_terminal"]
    if run.args.max_grad_norm > 0:
        wrong.append("no_clip")
    if "masked" in name:
        wrong += ["unmasked_h", "unmasked_target"]
    if run.kind == "tv":
        wrong += ["dual_after", "clamp_toggle"] + (["no_dual_clip"] if "building" in name else [])
    return wrong


def assert_widths(run):
    """Every network has the widths its flags give (the recomputation takes its shapes from the weights, so a network
    built with another flag's width would go unseen otherwise): the agents' DRQNs, Q_jt and V_tot --hidden-dim, the
    dual network --dual-hidden-dim; the target networks the shapes of the online ones."""
    a, init, N, A = run.args, run.spy.init, run.g["N"], run.g["A"]
    H, S, O = a.hidden_dim, run.g["env"].state_dim, run.g["env"].obs_dim
    shapes = {
        "q_network": {
            "drqn.fc1.weight_obs": (N, H, O),
            "drqn.lstm.weight_hh_l0": (N, 4 * H, H),
            "drqn.fc_out.weight": (N, A, H),
        },
        "qtran": {
            "action_fc.weight": (H, N * A),
            "q_fc.weight": (H, 2 * H),
            "v_state.weight": (H, S),
            "v_feat.weight": (H, H),
            "v_fc.weight": (H, 2 * H),
        },
    }
    if run.kind == "tv":
        D = a.dual_hidden_dim
        shapes["dual_network"] = {"state_fc.weight": (D, S), "action_fc.weight": (D, N * A), "fc.weight": (D, 2 * D)}
    for net, want in shapes.items():
        for key, shape in want.items():
            assert tuple(init[net][key].shape) == shape, (net, key, tuple(init[net][key].shape), shape)
    for online, target in (("q_network", "target_network"), ("qtran", "target_qtran")):
        assert {k: v.shape for k, v in init[target].items()} == {k: v.shape for k, v in init[online].items()}


# ------------------------------------------------------------------------------------------------
# 1. One update, exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ONE_UPDATE)
def test_one_update_moves_every_parameter_as_predicted(runs, name):
    """One gradient step of the real loop (n_updates == 1; the target network is still the initial one, as is the
    online network before the step) moves every parameter of the agents, Q_jt, V_tot and (TV) the dual network as
    the closed-form first optimiser steps of the gradients computed here predict: y (Eq. 15 / 16, batch-min Eq.
    27-29), L = L_td + L_opt + L_nopt with Q-hat detached and masked a_bar at h, the global-norm clip, RMSprop +
    Adam or one Adam, TV: the dual step first. The clip binds wherever it is set (global norms before it: rho
    building 205 > 10, released 1.94 > 0.05, batch-min 1.43 > 1, none on the other batch-min run, 3.36; TV 311,
    4.15, 3.77, 2.2, 2.47 > 1); the dual clip at 1 binds on the building task (3.12), not on the masked one
    (0.11-0.31), so both sides of it are seen. Each wrong loop of wrong_versions predicts something else by at
    least 50 tolerances. (The bootstrap from the online network cannot differ at the first update, theta =
    theta-: the frozen-target test covers it.)"""
    run = runs(name)
    assert run.n_updates == 1 and len(run.updates) == 1 and len(run.duals) == (run.kind == "tv")
    assert_widths(run)
    init, up = run.spy.init, run.updates[0]
    pre = run.duals[0]["weights"] if run.kind == "tv" else up["weights"]
    for net in init:  # nothing moved before the first step
        assert all(torch.equal(init[net][k], pre[net][k]) for k in init[net]), net
    for opt_state in (run.duals[0] if run.kind == "tv" else up)["opt_states"]:
        assert not opt_state  # first step: the optimisers start empty
    pred = Prediction(run, up, init["target_network"], init["target_qtran"])
    final = run.final()
    check_update(run, up, pred, after=final, tag=name)
    for net in ("target_network", "target_qtran"):  # the target networks never move
        assert all(torch.equal(init[net][k], final[net][k]) for k in init[net]), net
    a = run.args
    binds = a.max_grad_norm > 0 and pred.norm > a.max_grad_norm
    assert binds == (a.max_grad_norm > 0), (name, pred.norm)  # the clip is set to bind in this file's runs
    if run.kind == "tv":
        assert (pred.dual_norm > a.dual_max_grad_norm) == ("building" in name), (name, pred.dual_norm)
    for wrong in wrong_versions(run, name):
        other = Prediction(run, up, init["target_network"], init["target_qtran"], wrong={wrong})
        assert mismatch(run, up, other, final) > 50, f"{name}: the loop also matches the wrong version '{wrong}'"


# ------------------------------------------------------------------------------------------------
# 2. The target network
# ------------------------------------------------------------------------------------------------
def check_updates(run, target_of, wrong_target_of=None, tag=""):
    """Every update of the run against the prediction whose target networks are target_of(k) (agents, Q_jt); TV:
    eta from the dual network the loop stepped to (the first dual step itself is checked in test 1). With
    wrong_target_of, the prediction from those target weights must not match from the second update on."""
    for k, up in enumerate(run.updates):
        after = run.updates[k + 1]["weights"] if k + 1 < len(run.updates) else run.final()
        if run.kind == "tv" and k + 1 < len(run.updates):
            after = {**after, "dual_network": run.duals[k + 1]["weights"]["dual_network"]}
        dual_after = up["weights"]["dual_network"] if run.kind == "tv" else None
        pred = Prediction(run, up, *target_of(k), dual_after=dual_after)
        check_update(run, up, pred, after=after, tag=f"{tag} update {k + 1}")
        if wrong_target_of is not None and k >= 1:
            other = Prediction(run, up, *wrong_target_of(k), dual_after=dual_after)
            assert mismatch(run, up, other, after) > 50, f"{tag} update {k + 1}: also matches the wrong target"


@pytest.mark.parametrize("kind", ["rho", "tv"])
def test_frozen_target_bootstraps_from_the_initial_weights(runs, kind):
    """Three updates (env steps 40, 80, 120), the target never copied: every update's target y (and the TV dual
    loss's V') is computed from the *initial* agents and Q_jt (theta-), so the three updates match the prediction
    that uses the initial weights, and from the second update on (theta has moved) not the one bootstrapping from
    the online network of that update. Every parameter change is also the RMSprop / Adam step from the
    optimisers' states (not the first step any more)."""
    run = runs(f"{kind}_frozen")
    init = run.spy.init
    assert_widths(run)  # TV: a dual network narrower than the agents
    assert run.n_updates == 3 and [u["step"] for u in run.updates] == [40, 80, 120]
    assert run.g["rb"].version == 0  # no hard copy theta- <- theta
    check_updates(
        run,
        lambda k: (init["target_network"], init["target_qtran"]),
        lambda k: (run.updates[k]["weights"]["q_network"], run.updates[k]["weights"]["qtran"]),
        tag=kind,
    )
    final = run.final()
    for net in ("target_network", "target_qtran"):
        assert all(torch.equal(init[net][k], final[net][k]) for k in init[net]), net


@pytest.mark.parametrize("kind", ["rho", "tv"])
def test_copied_target_bootstraps_from_the_copy(runs, kind):
    """The same three updates with --target-network-frequency 40: theta- <- theta after each update (agents and
    Q_jt / V_tot together, Alg. 4 l.18 / Alg. 7 l.22), so update k bootstraps from the weights update k-1 left
    (the cached V' of the previous copy must not be reused), not from the initial ones."""
    run = runs(f"{kind}_copied")
    init = run.spy.init

    def copied(k):
        w = run.updates[k]["weights"] if k else init  # the weights after update k-1 = before update k
        return (w["q_network"], w["qtran"]) if k else (w["target_network"], w["target_qtran"])

    assert run.n_updates == 3 and run.g["rb"].version == 3
    check_updates(run, copied, lambda k: (init["target_network"], init["target_qtran"]), tag=kind)
    final = run.final()
    for online, target in (("q_network", "target_network"), ("qtran", "target_qtran")):
        assert all(torch.equal(final[online][k], final[target][k]) for k in final[online]), target


@pytest.mark.parametrize("name", ["tv_schedule_released"])
def test_released_schedule_makes_four_dual_then_four_q_steps(runs, name):
    """--update-schedule released (the released TV trainers: 4 dual-network steps, then 4 Q steps, each on its own
    minibatch, every 4 x --train-frequency env steps; docs/qtran.md item 11). Here --train-frequency 10: one training
    step, at env step 40 (none at 10, 20, 30), and the optimisers step dual x 4, then Q x 4 (Run asserts the order).
    The 8 minibatches are the 8 consecutive parts of one draw of 8 x 32 slots: the first 4 for the dual steps, the
    last 4 for the Q steps. Each dual step's gradient is Eq. (17) (released: squared, no clamp) on its own part at the
    weights it started from, and its change the Adam step from the state it found; every Q step's target takes eta of
    the dual network after all four dual steps, and its gradients and changes are predicted from its own part and the
    weights before it. eta after the first dual step only (the 1 + 1 interleaving) predicts something else."""
    run = runs(name)
    a, init, final = run.args, run.spy.init, run.final()
    assert len(run.duals) == run.n_updates == 4
    assert {c["step"] for c in run.spy.calls} == {40}  # one training step, at 4 x --train-frequency
    (drawn,) = [d[2] for d in run.draws if d[0] == "integers" and np.shape(d[2]) == (8 * a.batch_size,)]
    parts = np.split(drawn, 8)
    assert len({tuple(p) for p in parts}) == 8  # eight different minibatches
    for k in range(4):
        np.testing.assert_array_equal(run.duals[k]["dual_idx"], parts[k])
        np.testing.assert_array_equal(run.updates[k]["idx"], parts[4 + k])
    targets = (init["target_network"], init["target_qtran"])
    dual_final = final["dual_network"]
    for k, dual in enumerate(run.duals):  # each dual step: its own minibatch, from the weights it started from
        pred = Prediction(run, run.updates[k], *targets, dual_after=dual_final)
        err = worst_rel(dual["grads"]["dual_network"], pred.dual_grads)
        assert err < 1e-4, f"dual step {k + 1}: gradients off by {err:.2e}"
        before = dual["weights"]["dual_network"]
        after = run.duals[k + 1]["weights"]["dual_network"] if k < 3 else dual_final
        moved = {n: after[n].double() - before[n].double() for n in before}
        err = step_error(moved, pred.dual_step_from(run, dual, dual["grads"]["dual_network"]))
        assert err < 1, f"dual step {k + 1}: parameter changes off by {err:.2f} tolerances"
    for k, up in enumerate(run.updates):  # each Q step: eta of the dual network after all four dual steps
        assert all(torch.equal(up["weights"]["dual_network"][n], dual_final[n]) for n in dual_final)
        after = run.updates[k + 1]["weights"] if k < 3 else final
        check_update(
            run, up, Prediction(run, up, *targets, dual_after=dual_final), after=after, tag=f"Q step {k + 1}", dual=False
        )
    interleaved = Prediction(run, run.updates[0], *targets, dual_after=run.duals[1]["weights"]["dual_network"])
    assert mismatch(run, run.updates[0], interleaved, run.updates[1]["weights"]) > 50, "eta after one dual step also matches"


# ------------------------------------------------------------------------------------------------
# 3. Time limits bootstrap, terminations do not
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["rho_building_paper", "tv_building_paper", "rho_masked_released", "tv_masked_paper", "tv_masked_released"]
)
def test_time_limits_bootstrap(runs, name):
    """The replay stores terminated exactly as the task reported it (the building task never terminates: its day
    ends and the --episode-steps cap are time limits) and truncated at the cap and at the task's own time-out; at a
    time limit the target is r + gamma * bootstrap(V') with V' the target network's value of the next history
    (Eq. 15 / 16), at a termination the reward alone. The minibatch holds each kind (masked task: termination,
    time-out and cap; building: the cap), and the target that treats a time limit as terminal does not match."""
    run = runs(name)
    rb, log, cap = run.g["rb"], run.log, run.g["episode_steps"]
    n = len(log)
    assert np.array_equal(rb.terminated[:n], [float(tr["terminated"]) for tr in log])
    assert np.array_equal(rb.truncated[:n], [float(tr["env_truncated"] or tr["t"] == cap - 1) for tr in log])
    up, init = run.updates[0], run.spy.init
    pred = Prediction(run, up, init["target_network"], init["target_qtran"])
    y, r = up["values"]["target"].double(), pred.batch["reward"]
    kinds = {
        "terminated": [log[j]["terminated"] for j in up["idx"]],
        "timeout": [log[j]["env_truncated"] for j in up["idx"]],
        "cap": [log[j]["t"] == cap - 1 and not log[j]["terminated"] for j in up["idx"]],
    }
    kinds = {k: torch.tensor(v) for k, v in kinds.items()}
    assert kinds["cap"].any() and (
        kinds["terminated"].any() and kinds["timeout"].any() if "masked" in name else not kinds["terminated"].any()
    )
    assert torch.equal(y[kinds["terminated"]], r[kinds["terminated"]].float().double())  # y = r exactly
    limit = kinds["timeout"] | kinds["cap"]
    assert y_error(up, pred) < 1
    assert ((y - r)[limit].abs() > 1e-4).any(), "the time-limit targets carry no bootstrap"
    other = Prediction(run, up, init["target_network"], init["target_qtran"], wrong={"truncation_terminal"})
    assert mismatch(run, up, other, run.final()) > 50


# ------------------------------------------------------------------------------------------------
# 4. Unavailable actions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rho", "tv"])
def test_greedy_acting_is_masked(runs, kind):
    """Epsilon 0 on MaskedTeamGame (which raises on an unavailable action), 120 env steps with updates at 40, 80 and
    120: every action the loop took is the argmax of the *online* agents' Q_i(h_i, .) in force at that step (the
    initial weights, then those each update left; not the target network, frozen at the initial weights) over the
    actions available at that step, on the window rebuilt from the task's log; and the plain argmax would have taken
    an unavailable action at some steps (the masks matter)."""
    run = runs(f"{kind}_greedy")
    assert run.n_updates == 3 and len(run.log) >= 120
    weights = [run.spy.init["q_network"]] + [u["weights"]["q_network"] for u in run.updates[1:]] + [run.final()["q_network"]]
    steps = [0] + [u["step"] for u in run.updates]  # update k happened after the env step steps[k + 1]
    unavailable = 0
    for k, w in enumerate(weights):
        todo = np.arange(steps[k], steps[k + 1] if k + 1 < len(steps) else len(run.log))
        b = batch_from_log(run.log, todo, run.args.window)
        with torch.no_grad():
            q, _ = agents_forward(leaf(w, False), b["obs_w"], b["prev_w"], run.g["A"])
        assert torch.equal(b["actions"], masked_argmax(q, b["avail"])), f"actions after update {k}"
        unavailable += int((~b["avail"].gather(-1, q.argmax(-1)[..., None])).sum())
    assert unavailable >= 10


@pytest.mark.parametrize(
    "name",
    ["rho_masked_released", "rho_masked_batchmin_noclip", "tv_masked_paper", "tv_masked_released", "tv_masked_batchmin"],
)
def test_every_argmax_is_masked(runs, name):
    """Exploration, the target argmax a_bar' at h' and the greedy a_bar at h of L_opt use only available actions:
    every action in the log was available (the task raises otherwise); in the first update's minibatch the plain
    argmax of the target agents at h' and of the agents at h hits unavailable actions, and the predictions built
    with those plain argmaxes do not match the loop (with the masks they do: test 1)."""
    run = runs(name)
    assert all(tr["avail"][np.arange(len(tr["actions"])), tr["actions"]].all() for tr in run.log)
    up, init = run.updates[0], run.spy.init
    b = batch_from_log(run.log, up["idx"], run.args.window)
    with torch.no_grad():
        q_next, _ = agents_forward(leaf(init["target_network"], False), b["next_obs_w"], b["next_prev_w"], run.g["A"])
        q_h, _ = agents_forward(leaf(up["weights"]["q_network"], False), b["obs_w"], b["prev_w"], run.g["A"])
    live = b["terminated"] == 0
    assert (~b["next_avail"].gather(-1, q_next.argmax(-1)[..., None]).squeeze(-1))[live].any()
    assert (~b["avail"].gather(-1, q_h.argmax(-1)[..., None])).any()
    for wrong in ("unmasked_target", "unmasked_h"):
        other = Prediction(run, up, init["target_network"], init["target_qtran"], wrong={wrong})
        assert mismatch(run, up, other, run.final()) > 50, wrong


# ------------------------------------------------------------------------------------------------
# 5. Acting: seeds, history windows, the epsilon schedule, the draws
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rho_explore", "tv_explore"])
def test_acting_follows_the_history_the_epsilon_schedule_and_the_seeded_draws(runs, name):
    """Everything that decides an action, over 120 env steps with updates at 80 and 120 (learning starts after step
    40, a multiple of --train-frequency 40: an update at 40 would be one too early). (a) Seeding: torch's
    initial seed, the python and numpy global generators, the numpy Generator of days, exploration and minibatches
    and the task all come from --seed. (b) The online agents act (one q_network.greedy_q call per env step) on the
    window of the episode's last W observations and previous actions (zeros / action 0 before its start) rebuilt
    here from the task's log, with the Q-values of the weights in force (the initial ones, then those each update
    left). (c) The Generator's draws come in the loop's order: a day uniform on --train-days at each episode start
    (the day the task was reset to), at each step an (N, A) uniform draw whose argmax over the available actions is
    the random action and one coin per agent (one shared coin with --single-coin, the TV run), and at each update a
    minibatch of --batch-size indices (TV: 2 x, the dual half first) on [0, size), the ones the update used. (d) An
    agent's action is the random one where its coin < epsilon(step) (the loop's epsilon, read at its acting call, is
    asserted to be the schedule's value: linear from --start-e 1 to --end-e 0.05 over
    --exploration-steps 80, so both branches occur), else the masked argmax of its Q-values."""
    run = runs(name)
    a, log = run.args, run.log
    env_seed, torch_seed, py_state, np_state = run.seeds
    ref = np.random.RandomState(a.seed).get_state()
    assert env_seed == a.seed == torch_seed == run.rng_seed and py_state == random.Random(a.seed).getstate()
    assert np_state[0] == ref[0] and np.array_equal(np_state[1], ref[1]) and np_state[2:] == ref[2:]

    n, N, A = len(log), run.g["N"], run.g["A"]
    updates = [s for s in range(1, n + 1) if s > a.learning_starts and s % a.train_frequency == 0]
    assert [u["step"] for u in run.updates] == updates == [80, 120] and len(run.spy.acting) == n
    weights = [run.spy.init["q_network"]] + [u["weights"]["q_network"] for u in run.updates[1:]] + [run.final()["q_network"]]
    lo, hi = (int(x) for x in a.train_days.split(":"))
    draws = iter(run.draws)

    def draw(kind, shape, bounds=None):
        got = next(draws, None)
        assert got is not None and got[0] == kind and got[2].shape == shape, (kind, shape, got)
        assert bounds is None or tuple(got[1]) == bounds, (kind, got[1], bounds)
        return got[2]

    b = batch_from_log(log, np.arange(n), a.window)
    n_random = n_greedy = 0
    for j, tr in enumerate(log):
        if tr["t"] == 0:
            assert int(draw("integers", (), (lo, hi))) == run.days[tr["episode"]]
        obs_w, prev_w, q_acted, epsilon = run.spy.acting[j]
        assert epsilon == pytest.approx(expected_epsilon(a, j), rel=1e-9, abs=1e-12), (j, epsilon)
        assert torch.equal(obs_w[:, 0].double(), b["obs_w"][:, j]) and torch.equal(prev_w[:, 0], b["prev_w"][:, j]), j
        w = weights[sum(u <= j for u in updates)]
        with torch.no_grad():
            q, _ = agents_forward(leaf(w, False), b["obs_w"][:, j : j + 1], b["prev_w"][:, j : j + 1], A)
        torch.testing.assert_close(q_acted.double(), q, rtol=1e-5, atol=1e-5)
        uniform = draw("random", (N, A))
        coins = np.broadcast_to(draw("random", (1,) if a.single_coin else (N,)), (N,))
        explore = coins < epsilon
        want = np.where(explore, np.argmax(uniform * tr["avail"], axis=1), masked_argmax(q[0], b["avail"][j]).numpy())
        np.testing.assert_array_equal(tr["actions"], want, err_msg=f"step {j} (exploring: {explore})")
        n_random, n_greedy = n_random + int(explore.sum()), n_greedy + int((~explore).sum())
        if j + 1 in updates:
            up = run.updates[updates.index(j + 1)]
            drawn = draw("integers", ((2 if run.kind == "tv" else 1) * a.batch_size,), (0, j + 1))
            want = np.concatenate([up["dual_idx"], up["idx"]]) if run.kind == "tv" else up["idx"]
            np.testing.assert_array_equal(drawn, want)
    assert next(draws, None) is None  # nothing else drawn
    assert n_random >= 30 and n_greedy >= 30, (n_random, n_greedy)
