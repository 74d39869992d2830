"""The training loops of robust_vdn_rho.py, robust_vdn_tv.py, robust_qmix_rho.py and robust_qmix_tv.py, checked step
by step.

Each script runs in this process as __main__ (conftest.run_script_in_process), exactly its own loop, on
``FakeTask``: a tiny task written here (3 agents, 5 actions of which only 2 are available to each agent at
each step, random observations, states and rewards), monkeypatched in for envs.make_env. Its episodes come
in a fixed cycle of three that tell every kind of ending apart:

* a *terminal* episode: terminated=True after 3 steps (a true end, nothing to bootstrap);
* a *time-out* episode: the task itself reports truncated=True after 4 steps (building's end of day,
  SMAX's time-out), terminated=False;
* a *capped* episode: the task says nothing, the script's --episode-steps 5 cap ends it (a time limit).

The task logs everything it showed and every action it was sent, so the tests build their own windows,
targets and losses from that log (never from the script's functions) and compare with what the loop did:

* global optimiser hooks record, for every step of every optimiser, the parameters before and after and the
  gradients it was handed (after the clip); runs.Run.track (the call that hands the run its training objects)
  is wrapped to keep a copy of every network's initial weights and to log every call of the online network's
  greedy_q (acting: its windows and Q-values); the number of gradient steps is the number of optimiser steps
  recorded, the number of hard copies the replay buffer's target version (rb.version);
  F.mse_loss is wrapped to keep the TD target y of each update; the script's numpy Generator is a DrawLog (the
  same PCG64 stream, every draw logged), and envs.make_env notes its seed and the global generators' states.
* the recomputation is plain torch written out here: the DRQN (fc1 on [obs, one-hot previous action],
  LSTM cell by cell, ReLU, fc_out), the QMIX mixer (hypernetworks on s, |w|), the dual network eta_xi(s, a)
  (Linear on the concatenated one-hot joint action); the targets of Eq. 15 (rho-contamination) and
  Eq. 16-17 (TV) with the masked max over available actions, (1 - terminated) only, and
  torch's clip_grad_norm_ and first RMSprop / Adam steps in closed form.

Five groups of tests, the first four one per item of issue 16, each parametrised over the four scripts (the
one-update runs: rho-contamination with rho > 0, rho = 0 under a binding clip and --worst-value batch-min for
VDN-rho; both dual losses, clamps, clips and optimisers, and a case where Eq. (10)'s upper end binds, for TV):

1. one update (learning starts at 10, 12 env steps: exactly one gradient step): the gradients and the moves
   of every parameter (agents, mixer, dual network) are the ones predicted; plausible wrong computations
   (rho dropped, truncation as terminal, unmasked max, clamp or dual loss confused, dual step after the Q
   step, sum instead of the mixer) predict something measurably different.
2. frozen target (no hard copy in 36 steps): the cached bootstraps and the last update's gradient are those
   of the *initial* target weights, not of the online ones; with a copy every 8 steps, the target holds the
   online weights of the last copy and the cache their values.
3. time limits: the time-out and capped transitions are stored with terminated=0 and their target includes
   gamma times the bootstrap; the terminal one's target is r.
4. unavailable actions: no unavailable action is ever sent to the task (random exploration and greedy
   acting), every greedy action is the masked argmax of the online network in force, and the bootstrap is
   the masked max (the unmasked one would differ).
5. acting: every generator is seeded from --seed, the online network acts on the episode's history window with
   the weights in force, and every action, day and minibatch follows from the logged draws, the masks and the
   epsilon schedule (copy8 runs epsilon 1 -> 0.05 over 24 steps; two cases use --single-coin).
"""

from __future__ import annotations

import copy
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script_in_process
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import envs
import runs as run_plumbing  # the scripts' runs module: they look up runs.Run when they run, so a subclass patched in is used

SCRIPTS = {
    "vdn_rho": "algos/robust_vdn_rho.py",
    "vdn_tv": "algos/robust_vdn_tv.py",
    "qmix_rho": "algos/robust_qmix_rho.py",
    "qmix_tv": "algos/robust_qmix_tv.py",
}
N_AGENTS, N_ACTIONS, OBS_DIM, STATE_DIM, N_AVAIL = 3, 5, 4, 6, 2
EPISODE_LIMIT, CAP = 6, 5  # the task's own limit; the --episode-steps cap the runs use
KINDS = (("terminal", 3), ("timeout", 4), ("capped", CAP))  # (kind, length): one cycle = 12 env steps
STATE_SCALE = 5.0  # spreads eta_xi(s, a) at initialisation over both signs
GAMMA, RHO, WINDOW, HIDDEN, EMBED, DUAL_HIDDEN = 0.9, 0.3, 3, 8, 4, 8
LR, DUAL_LR, RMSPROP_EPS, ADAM_EPS, ALPHA = 5e-4, 1e-3, 1e-5, 1e-8, 0.99

COMMON = [
    "--env",
    "building",
    "--episode-steps",
    CAP,
    "--learning-starts",
    10,
    "--train-frequency",
    2,
    "--buffer-size",
    200,
    "--window",
    WINDOW,
    "--hidden-dim",
    HIDDEN,
    "--gamma",
    GAMMA,
    "--rho",
    RHO,
    "--learning-rate",
    LR,
    "--torch-threads",
    1,
    "--log-every",
    100,
    "--checkpoint-every",
    0,
    "--seed",
    5,
]
QMIX_FLAGS = ["--mixing-embed-dim", EMBED]
TV_FLAGS = ["--dual-hidden-dim", DUAL_HIDDEN, "--dual-learning-rate", DUAL_LR]
EXTRA = {"vdn_rho": [], "vdn_tv": TV_FLAGS, "qmix_rho": QMIX_FLAGS, "qmix_tv": QMIX_FLAGS + TV_FLAGS}

# One-update cases: (script, case) -> flags. A clip named here binds (the test asserts the gradient norm
# exceeds it); every other case runs unclipped (VDN-TV's default 0) or under a clip that does not bind
# (QMIX's default 10: asserted too).
ONE_UPDATE = {
    ("vdn_rho", "rho"): [],  # Alg. 2 as written: Eq. 15 with min V = 0; no clip (VDN's default)
    ("vdn_rho", "rho0-clipped"): ["--rho", 0, "--max-grad-norm", 0.05],  # plain VDN, the clip binds
    ("vdn_rho", "batch-min"): ["--worst-value", "batch-min", "--single-coin"],  # Eq. 27-28: + rho m, m = min V' of the batch
    # the paper's Alg. 5: Eq. 17 as written, eta clamped to Eq. (10); a dual network narrower than the agents' (6 vs 8)
    ("vdn_tv", "linear-clamp"): ["--dual-hidden-dim", 6],
    ("vdn_tv", "batch-min"): ["--worst-value", "batch-min", "--seed", 1],  # Eq. 29, Eq. (10) around m = min V' of the batch
    ("vdn_tv", "squared-noclamp-clipped"): [
        "--dual-loss",
        "squared",
        "--no-eta-clamp",
        "--max-grad-norm",
        0.05,
        "--dual-max-grad-norm",
        0.02,
    ],  # the released code's dual, both clips bind
    ("qmix_rho", "rmsprop-clipped"): ["--max-grad-norm", 0.05],
    ("qmix_rho", "adam"): ["--optimizer", "adam"],  # the released QMIX optimiser; clip 10 does not bind
    ("qmix_tv", "linear-clamp-rmsprop"): [],
    ("qmix_tv", "batch-min"): ["--worst-value", "batch-min"],
    ("qmix_tv", "batch-min-squared"): ["--worst-value", "batch-min", "--dual-loss", "squared"],  # m enters the gradient
    # eta_max = 2 / (rho (1 - gamma)) = 5, and a dual step large enough to take eta above it on part of the batch
    ("qmix_tv", "upper-clamp"): ["--rho", 0.8, "--gamma", 0.5, "--dual-learning-rate", 0.5],
    ("qmix_tv", "squared-noclamp-adam-clipped"): [
        "--dual-loss",
        "squared",
        "--no-eta-clamp",
        "--optimizer",
        "adam",
        "--max-grad-norm",
        0.05,
        "--dual-max-grad-norm",
        0.02,
        "--single-coin",
        "--dual-hidden-dim",
        12,
    ],
}
CLIPS = {
    ("vdn_rho", "rho0-clipped"): (0.05, 0.0),
    ("vdn_tv", "squared-noclamp-clipped"): (0.05, 0.02),
    ("qmix_rho", "rmsprop-clipped"): (0.05, 0.0),
    ("qmix_tv", "squared-noclamp-adam-clipped"): (0.05, 0.02),
    ("qmix_tv", "upper-clamp"): (10.0, 0.0),
}  # (Q clip, dual clip); 0 = none
# --update-schedule released, per TV script: VDN with the paper's dual (linear, clamped), QMIX with the released one
SCHEDULE = {
    "schedule-paper-dual": [],
    "schedule-released-dual": ["--dual-loss", "squared", "--no-eta-clamp", "--optimizer", "adam", "--single-coin"],
}


# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------
class FakeTask:
    """3 agents, 5 actions, only 2 available to each agent at each step (drawn anew every step); random
    observations, states and rewards from the task's own generator (independent of the script's seeds).
    Episodes cycle through KINDS. Logs every observation, state, mask, action, reward and flag; an
    unavailable action is recorded in ``violations`` (and replaced, so the run goes on and the test says
    which step)."""

    n_agents, n_actions, obs_dim, state_dim, episode_limit = N_AGENTS, N_ACTIONS, OBS_DIM, STATE_DIM, EPISODE_LIMIT

    def __init__(self):
        self.rng = np.random.default_rng(2024)
        self.episodes: list[dict] = []
        self.violations: list[tuple] = []

    def _observe(self):
        obs = self.rng.normal(size=(N_AGENTS, OBS_DIM)).astype(np.float32)
        state = (STATE_SCALE * self.rng.normal(size=STATE_DIM)).astype(np.float32)
        avail = np.zeros((N_AGENTS, N_ACTIONS), dtype=bool)
        for i in range(N_AGENTS):
            avail[i, self.rng.choice(N_ACTIONS, N_AVAIL, replace=False)] = True
        ep = self.episodes[-1]
        ep["obs"].append(obs)
        ep["state"].append(state)
        ep["avail"].append(avail)
        return obs.copy(), state.copy(), avail.copy()

    def reset(self, day: int):
        kind, length = KINDS[len(self.episodes) % len(KINDS)]
        self.episodes.append(
            {
                "kind": kind,
                "length": length,
                "day": day,
                "obs": [],
                "state": [],
                "avail": [],
                "actions": [],
                "reward": [],
                "terminated": [],
                "truncated": [],
            }
        )
        return self._observe()

    def step(self, actions):
        ep = self.episodes[-1]
        actions = np.asarray(actions, dtype=np.int64).reshape(N_AGENTS).copy()
        t = len(ep["actions"])
        for i in np.flatnonzero(~ep["avail"][t][np.arange(N_AGENTS), actions]):
            self.violations.append((len(self.episodes) - 1, t, int(i), int(actions[i])))
        ep["actions"].append(actions)
        reward = float(self.rng.uniform(-1.0, 1.0))
        end = t + 1 == ep["length"]
        terminated = end and ep["kind"] == "terminal"
        truncated = (end and ep["kind"] == "timeout") or t + 1 >= EPISODE_LIMIT
        ep["reward"].append(reward)
        ep["terminated"].append(terminated)
        ep["truncated"].append(truncated)
        obs, state, avail = self._observe()
        return obs, state, avail, reward, terminated, truncated, {}

    def close(self):
        pass


def transitions(task: FakeTask) -> dict:
    """Every transition the task served, in order (= replay slot: the buffer never wraps here), as arrays:
    windows ending at t and at t+1 built from the log (zero observations / previous action 0 before the
    episode start), s, s', a, r, the task's flags, the time-limit flag (the task's or the --episode-steps
    cap's) and the masks at t and t+1."""
    keys = (
        "obs_w",
        "prev_w",
        "next_obs_w",
        "next_prev_w",
        "state",
        "next_state",
        "actions",
        "reward",
        "terminated",
        "time_limit",
        "avail",
        "next_avail",
        "episode",
        "t",
    )
    out = {k: [] for k in keys}
    zeros_obs, zeros_a = np.zeros((N_AGENTS, OBS_DIM), np.float32), np.zeros(N_AGENTS, np.int64)
    for e, ep in enumerate(task.episodes):

        def window(end, ep=ep):
            taus = range(end - WINDOW + 1, end + 1)
            return (
                np.stack([ep["obs"][tau] if tau >= 0 else zeros_obs for tau in taus]),
                np.stack([ep["actions"][tau - 1] if tau >= 1 else zeros_a for tau in taus]),
            )

        for t in range(len(ep["actions"])):
            (ow, pw), (now, npw) = window(t), window(t + 1)
            row = {
                "obs_w": ow,
                "prev_w": pw,
                "next_obs_w": now,
                "next_prev_w": npw,
                "state": ep["state"][t],
                "next_state": ep["state"][t + 1],
                "actions": ep["actions"][t],
                "reward": ep["reward"][t],
                "terminated": float(ep["terminated"][t]),
                "time_limit": float(ep["truncated"][t] or t == CAP - 1),
                "avail": ep["avail"][t],
                "next_avail": ep["avail"][t + 1],
                "episode": e,
                "t": t,
            }
            for k in keys:
                out[k].append(row[k])
    arrays = {k: np.stack(v) if isinstance(v[0], np.ndarray) else np.array(v) for k, v in out.items()}
    arrays["reward"] = arrays["reward"].astype(np.float32)
    arrays["terminated"] = arrays["terminated"].astype(np.float32)
    return arrays


def batch(tr: dict, idx) -> dict:
    """The transitions idx as torch tensors, windows time-major (W, B, N, ...)."""
    b = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in tr.items()}
    for k in ("obs_w", "prev_w", "next_obs_w", "next_prev_w"):
        b[k] = b[k].transpose(0, 1).contiguous()
    return b


# ------------------------------------------------------------------------------------------------
# Running a script and recording what its loop did
# ------------------------------------------------------------------------------------------------
class DrawLog(np.random.Generator):
    """np.random.default_rng(seed) for the script (the same PCG64 stream, so the same numbers), logging every
    ``integers`` and ``random`` draw as (name, (low, high) or None, result)."""

    def __init__(self, seed, log: list):
        super().__init__(np.random.PCG64(seed))
        self.log = log

    def integers(self, low, high=None, size=None, *args, **kwargs):
        out = super().integers(low, high, size, *args, **kwargs)
        self.log.append(("integers", (low, high), np.copy(out)))
        return out

    def random(self, size=None, *args, **kwargs):
        out = super().random(size, *args, **kwargs)
        self.log.append(("random", None, np.copy(out)))
        return out


class Recording:
    """What one in-process run did: ``g`` (its globals at the end), ``task``, ``init`` (each network's
    initial state dict), ``steps`` (one dict per optimiser step: which, before, grad, after), ``targets``
    (the y handed to F.mse_loss at each update), ``acting`` (the inputs and output of every q_network.greedy_q
    call: the acting windows, Q-values and the loop's epsilon then), ``draws`` (every draw of the script's numpy Generator, see DrawLog),
    ``rng_seed`` (the seed it was made from), ``env_kwargs`` (of the envs.make_env call) and ``seeds`` (torch's
    initial seed and the python and numpy global states when the task was made)."""

    def __init__(self):
        self.g, self.task, self.init, self.state, self.steps, self.targets = None, None, {}, {}, [], []
        self.acting, self.draws, self.rng_seed, self.env_kwargs, self.seeds = [], [], "not made", None, None

    def q_steps(self):
        return [s for s in self.steps if s["which"] == "q"]

    def dual_steps(self):
        return [s for s in self.steps if s["which"] == "dual"]


def _modules_of(state: dict, which: str) -> list[str]:
    names = ["q_network", "mixer"] if which == "q" else ["dual_network"]
    return [n for n in names if n in state]


def _snapshot(state: dict, which: str, grads: bool) -> dict:
    out = {}
    for mod in _modules_of(state, which):
        for name, p in state[mod].named_parameters():
            out[(mod, name)] = (p.grad.detach().clone() if p.grad is not None else None) if grads else p.detach().clone()
    return out


def run(script: str, flags, cwd: str) -> Recording:
    """SCRIPTS[script] as __main__ on a FakeTask, with the hooks that fill a Recording."""
    rec = Recording()
    real_run, real_mse = run_plumbing.Run, F.mse_loss

    class CapturingRun(real_run):
        def track(self, **state):  # the scripts call it more than once: collect what each call hands over
            rec.state.update(state)
            rec.init.update({k: copy.deepcopy(v.state_dict()) for k, v in state.items() if isinstance(v, torch.nn.Module)})
            if "q_network" not in state:
                return super().track(**state)
            greedy_q = state["q_network"].greedy_q

            def acting(obs_w, prev_w, *a, **k):
                out = greedy_q(obs_w, prev_w, *a, **k)
                epsilon = sys._getframe(1).f_globals.get("epsilon")  # the loop's epsilon of this step (read only)
                rec.acting.append((obs_w.clone(), prev_w.clone(), out.clone(), epsilon))
                return out

            state["q_network"].greedy_q = acting  # the online network's no-grad forward: acting only in these scripts
            super().track(**state)

    def which(opt):
        return "q" if opt is rec.state.get("optimizer") else "dual" if opt is rec.state.get("dual_optimizer") else None

    def pre(opt, args, kwargs):
        w = which(opt)
        if w is not None:
            rec.steps.append({"which": w, "before": _snapshot(rec.state, w, False), "grad": _snapshot(rec.state, w, True)})

    def post(opt, args, kwargs):
        w = which(opt)
        if w is not None:
            rec.steps[-1]["after"] = _snapshot(rec.state, w, False)

    def mse(input, target, *args, **kwargs):
        rec.targets.append(target.detach().clone())
        return real_mse(input, target, *args, **kwargs)

    def make_env(*args, **kwargs):
        rec.env_kwargs, rec.seeds = kwargs, (torch.initial_seed(), random.getstate(), np.random.get_state())
        rec.task = FakeTask()
        return rec.task

    real_default_rng = np.random.default_rng

    def default_rng(seed=None):
        if sys._getframe(1).f_globals.get("__name__") != "__main__":  # not the script's own generator
            return real_default_rng(seed)
        rec.rng_seed = seed
        return DrawLog(seed, rec.draws)

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_plumbing, "Run", CapturingRun)
        mp.setattr(envs, "make_env", make_env)
        mp.setattr(F, "mse_loss", mse)
        mp.setattr(np.random, "default_rng", default_rng)
        try:
            rec.g = run_script_in_process(SCRIPTS[script], [*COMMON, *EXTRA[script], *flags], cwd)
        finally:
            for h in handles:
                h.remove()
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each (script, case) run once per module, on demand."""
    cache = {}

    def get(script: str, case: str) -> Recording:
        if (script, case) not in cache:
            cwd = str(tmp_path_factory.mktemp(f"{script}_{case}"))
            if case in SCHEDULE:  # --update-schedule released: 19 env steps, one training step (at 16)
                flags = ["--total-episodes", 5, "--batch-size", 16, "--target-network-frequency", 1000, "--run-name", case]
                flags += ["--update-schedule", "released", *SCHEDULE[case]]
            elif case in ("frozen", "copy8"):  # frozen: greedy acting; copy8: epsilon from 1 to 0.05 over 24 steps
                freq, explore = (
                    (10**9, [0, "--end-e", 0]) if case == "frozen" else (8, [1, "--end-e", 0.05, "--exploration-steps", 24])
                )
                flags = [
                    "--total-episodes",
                    9,
                    "--batch-size",
                    8,
                    "--start-e",
                    *explore,
                    "--target-network-frequency",
                    freq,
                    "--run-name",
                    case,
                ]
            else:
                flags = [
                    "--total-episodes",
                    3,
                    "--batch-size",
                    32,
                    "--target-network-frequency",
                    1000,
                    "--run-name",
                    case,
                    *ONE_UPDATE[(script, case)],
                ]
            cache[(script, case)] = run(script, flags, cwd)
        return cache[(script, case)]

    return get


# ------------------------------------------------------------------------------------------------
# The independent computation
# ------------------------------------------------------------------------------------------------
def agent_q(p: dict, obs_w, prev_w):
    """Q_i(h_i, .) of every agent (B, N, A) from the state dict p of the agents (key 'drqn.<name>'):
    x = ReLU(W_obs o + W_a onehot(a_prev) + b), an LSTM cell by cell from zero state (gates i, f, g, o),
    ReLU of the last output, then the output layer."""
    W, B = prev_w.shape[:2]
    qs = []
    for k in range(N_AGENTS):
        x = (
            obs_w[:, :, k] @ p["drqn.fc1.weight_obs"][k].T
            + p["drqn.fc1.weight_onehot"][k][prev_w[:, :, k]]
            + p["drqn.fc1.bias"][k]
        )
        x = torch.relu(x)
        h = c = x.new_zeros(B, p["drqn.lstm.weight_hh_l0"].shape[-1])
        for t in range(W):
            gates = (
                x[t] @ p["drqn.lstm.weight_ih_l0"][k].T
                + p["drqn.lstm.bias_ih_l0"][k]
                + h @ p["drqn.lstm.weight_hh_l0"][k].T
                + p["drqn.lstm.bias_hh_l0"][k]
            )
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        qs.append(torch.relu(h) @ p["drqn.fc_out.weight"][k].T + p["drqn.fc_out.bias"][k])
    return torch.stack(qs, 1)


def linear(p: dict, name: str, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def mix(m: dict, q, s):
    """QMIX f(q, s) = ELU(q |W1(s)| + b1(s)) . |w2(s)| + V(s), V(s) = Linear(ReLU(Linear(s)))."""
    w1 = linear(m, "hyper_w1", s).abs().view(-1, N_AGENTS, EMBED)
    hidden = F.elu(torch.einsum("bn,bne->be", q, w1) + linear(m, "hyper_b1", s))
    v = linear(m, "hyper_v.2", torch.relu(linear(m, "hyper_v.0", s)))[:, 0]
    return (hidden * linear(m, "hyper_w2", s).abs()).sum(-1) + v


def dual_eta(d: dict, s, a):
    """eta_xi(s, a) = out(ReLU(fc([ReLU(state_fc(s)), ReLU(action_fc(onehot(a_1) .. onehot(a_N)))])))."""
    onehot = F.one_hot(a, N_ACTIONS).float().reshape(len(a), N_AGENTS * N_ACTIONS)
    x = torch.cat([torch.relu(linear(d, "state_fc", s)), torch.relu(linear(d, "action_fc", onehot))], -1)
    return linear(d, "out", torch.relu(linear(d, "fc", x)))[:, 0]


def is_tv(script: str) -> bool:
    return script.endswith("_tv")


def is_vdn(script: str) -> bool:
    return script.startswith("vdn")


def q_tot(script: str, agents: dict, mixer: dict | None, q_per_agent, s):
    return q_per_agent.sum(-1) if is_vdn(script) else mix(mixer, q_per_agent, s)


def next_value(script: str, target: dict, target_mixer: dict | None, b: dict, masked=True):
    """V' = Q_tot(h', a_bar'; theta-): each agent's max over its available actions at t+1 (the unmasked max
    with masked=False), summed (VDN) or mixed on s' by the target mixer (QMIX)."""
    with torch.no_grad():
        q = agent_q(target, b["next_obs_w"], b["next_prev_w"])
        if masked:
            q = q.masked_fill(~b["next_avail"], -float("inf"))
        return q_tot(script, target, target_mixer, q.max(-1).values, b["next_state"])


def worst_value(f: dict, v, terminated):
    """min V: 0 (Assumption 1/2, --worst-value zero) or, with batch-min, m = the smallest V' of the minibatch, V' = 0
    at a terminated transition (its next state is terminal)."""
    return (v * (1.0 - terminated)).min() if f["worst"] == "batch-min" else 0.0


def bootstrap(script: str, v, eta, f: dict, terminated):
    """Eq. 15 (rho-contamination): (1 - rho) V', + rho m with batch-min (Eq. 27-28); Eq. 16 (TV): (1 - rho) eta -
    [eta - V']_+, with batch-min (Eq. 29) m + (1 - rho) (eta - m) - [eta - V']_+."""
    rho, m = f["rho"], worst_value(f, v, terminated)
    if is_tv(script):
        return m + (1.0 - rho) * (eta - m) - torch.relu(eta - v)
    return (1.0 - rho) * v + rho * m


def clamp_eta(raw, f: dict, v, terminated, clamp=None):
    """eta clamped to Eq. (10)'s [m, m + 2 / (rho (1 - gamma))] (m = min V of the batch of V' v, 0 with --worst-value
    zero) if clamp (default: the run's --eta-clamp)."""
    clamp = f["clamp"] if clamp is None else clamp
    m = worst_value(f, v, terminated)
    return raw.clamp(m, m + 2.0 / (f["rho"] * (1.0 - f["gamma"]))) if clamp else raw


def leaves(sd: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(True) for k, v in sd.items()}


def clipped(grads: dict, max_norm: float) -> tuple[dict, float]:
    """torch.nn.utils.clip_grad_norm_: the total 2-norm; grads scaled by max_norm / (norm + 1e-6) if above."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    return {k: g * coef for k, g in grads.items()}, norm


def first_step(grads: dict, optimiser: str, lr: float) -> dict:
    """The move of a first optimiser step from zero state: RMSprop -lr g / (sqrt(1 - alpha) |g| + eps),
    Adam (bias-corrected m = g, v = g^2) -lr g / (|g| + eps)."""
    if optimiser == "adam":
        return {k: -lr * g / (g.abs() + ADAM_EPS) for k, g in grads.items()}
    return {k: -lr * g / ((1 - ALPHA) ** 0.5 * g.abs() + RMSPROP_EPS) for k, g in grads.items()}


def flags_of(rec: Recording) -> dict:
    a = rec.g["args"]
    return {
        "optimizer": getattr(a, "optimizer", "rmsprop"),
        "clip": a.max_grad_norm,
        "dual_clip": getattr(a, "dual_max_grad_norm", 0),
        "squared": getattr(a, "dual_loss", "") == "squared",
        "clamp": getattr(a, "eta_clamp", True),
        "rho": a.rho,
        "worst": a.worst_value,
        "gamma": a.gamma,
    }


def dual_prediction(dual_params: dict, v, b: dict, f: dict, squared: bool, clamp: bool, dual_clip: float):
    """Eq. (17) on the dual minibatch: mean over non-terminated transitions of [eta - V']_+ - (1 - rho) (eta - m)
    (m = 0, or the batch's min V' with batch-min; squared: its square), eta the clamped output, + (raw - eta)^2
    (pulls a clamped eta back; 0 without the clamp) -> (loss, clipped gradients of xi, gradient norm)."""
    d = leaves(dual_params)
    raw = dual_eta(d, b["state"], b["actions"])
    eta = clamp_eta(raw, f, v, b["terminated"], clamp)
    term = torch.relu(eta - v) - (1.0 - f["rho"]) * (eta - worst_value(f, v, b["terminated"]))
    term = term**2 if squared else term
    term = term + (raw - eta.detach()) ** 2
    live = 1.0 - b["terminated"]
    loss = (live * term).sum() / live.sum()
    grads = dict(zip(d, torch.autograd.grad(loss, list(d.values()))))
    grads, norm = clipped(grads, dual_clip)
    return loss, grads, norm


def q_prediction(script: str, agents: dict, mixer: dict | None, y, b: dict, clip: float):
    """Mean squared TD error of Q_tot(h, a; theta) against y -> (clipped gradients keyed (module, name), norm)."""
    p = leaves(agents)
    m = leaves(mixer) if mixer is not None else None
    q = agent_q(p, b["obs_w"], b["prev_w"]).gather(-1, b["actions"][..., None]).squeeze(-1)
    loss = ((q_tot(script, p, m, q, b["state"]) - y) ** 2).mean()
    named = {("q_network", k): v for k, v in p.items()} | ({("mixer", k): v for k, v in m.items()} if m else {})
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    return clipped(grads, clip)


def target_y(script: str, b: dict, v, eta, f: dict, time_limit_terminal=False):
    """y = r + gamma (1 - terminated) bootstrap; time_limit_terminal (a wrong variant): also 0 at a time limit."""
    done = torch.maximum(b["terminated"], b["time_limit"].float()) if time_limit_terminal else b["terminated"]
    return b["reward"] + f["gamma"] * (1.0 - done) * bootstrap(script, v, eta, f, b["terminated"])


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def scale(d: dict) -> float:
    return max(v.abs().max().item() for v in d.values())


GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # atol relative to the largest gradient entry


def grad_error(recorded: dict, predicted: dict) -> float:
    """The largest |recorded - predicted| over every entry of every tensor, in units of the tolerance
    GRAD_ATOL * max|predicted| + GRAD_RTOL * |predicted|: <= 1 is a match."""
    atol = GRAD_ATOL * scale(predicted)
    return max(((recorded[k] - p).abs() / (atol + GRAD_RTOL * p.abs())).max().item() for k, p in predicted.items())


def assert_grads(recorded: dict, predicted: dict, what: str):
    """The gradients the optimiser was handed = ours, every tensor (agents, mixer, dual network)."""
    assert recorded.keys() == predicted.keys(), what
    assert all(recorded[k] is not None for k in predicted), what
    err = grad_error(recorded, predicted)
    assert err <= 1.0, f"{what}: off by {err:.3g} tolerances"


def assert_distinct(recorded: dict, wrong: dict, what: str):
    """A wrong computation's gradients miss the recorded ones by more than 10 tolerances somewhere."""
    assert grad_error(recorded, wrong) > 10.0, f"the check cannot see: {what}"


def assert_moves(init: dict, final: dict, predicted: dict, what: str, lr: float):
    """theta_1 - theta_0 = the predicted first step, for every parameter tensor."""
    for k, move in predicted.items():
        torch.testing.assert_close(final[k] - init[k], move, rtol=2e-3, atol=2e-3 * lr, msg=lambda m, k=k: f"{what} {k}: {m}")


def assert_widths(rec: Recording):
    """Every network has the widths its flags give: the agents' DRQNs --hidden-dim, the mixer's hypernetworks
    --mixing-embed-dim, the dual network --dual-hidden-dim (the recomputation takes its shapes from the weights, so
    a network built with another flag's width would go unseen otherwise)."""
    a, H, S = rec.g["args"], rec.g["args"].hidden_dim, STATE_DIM
    shapes = {
        "q_network": {
            "drqn.fc1.weight_obs": (N_AGENTS, H, OBS_DIM),
            "drqn.fc1.weight_onehot": (N_AGENTS, N_ACTIONS, H),
            "drqn.lstm.weight_hh_l0": (N_AGENTS, 4 * H, H),
            "drqn.fc_out.weight": (N_AGENTS, N_ACTIONS, H),
        }
    }
    if "mixer" in rec.init:
        E = a.mixing_embed_dim
        shapes["mixer"] = {
            "hyper_w1.weight": (N_AGENTS * E, S),
            "hyper_b1.weight": (E, S),
            "hyper_w2.weight": (E, S),
            "hyper_v.0.weight": (E, S),
            "hyper_v.2.weight": (1, E),
        }
    if "dual_network" in rec.init:
        D = a.dual_hidden_dim
        shapes["dual_network"] = {
            "state_fc.weight": (D, S),
            "action_fc.weight": (D, N_AGENTS * N_ACTIONS),
            "fc.weight": (D, 2 * D),
            "out.weight": (1, D),
        }
    for net, want in shapes.items():
        for key, shape in want.items():
            assert tuple(rec.init[net][key].shape) == shape, (net, key, tuple(rec.init[net][key].shape), shape)
        target = {"q_network": "target_network", "mixer": "target_mixer"}.get(net)
        if target is not None:
            assert {k: v.shape for k, v in rec.init[target].items()} == {k: v.shape for k, v in rec.init[net].items()}


# ------------------------------------------------------------------------------------------------
# 1. one update
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,case", list(ONE_UPDATE))
def test_one_update_moves_every_parameter_as_predicted(runs, script, case):
    """12 env steps, learning from step 10, one gradient step every 2 steps: exactly one update, at step 12,
    on a minibatch that holds the terminal, the time-out and the capped transition. TV: first the dual
    network's Adam step on Eq. (17) over the dual half of the draw (V' of the target network = theta_0,
    terminated transitions weighted 0), then the Q step with eta of the *updated* dual network (clamped to
    Eq. (10)'s [0, 2/(rho(1-gamma))] or not, per --eta-clamp) in Eq. (16); rho: Eq. (15). The gradients each
    optimiser was handed (after clip_grad_norm_, binding where CLIPS says so, asserted) equal ours, and every
    parameter moved by the closed-form first RMSprop / Adam step. Wrong computations -- a time limit taken as
    terminal, the unmasked max, rho dropped, the sum instead of the mixer, the clamp flipped, eta of the dual
    network before its step, the other dual loss, terminated transitions in the dual loss -- give gradients
    more than 10 tolerances away from the recorded ones somewhere: the check sees each of them."""
    rec = runs(script, case)
    g, f, a = rec.g, flags_of(rec), rec.g["args"]
    assert len(rec.q_steps()) == 1 and g["global_step"] == 12
    tv = is_tv(script)
    assert [s["which"] for s in rec.steps] == (["dual", "q"] if tv else ["q"])  # TV: the dual step comes first
    tr = transitions(rec.task)
    theta0, mixer0 = rec.init["q_network"], rec.init.get("mixer")
    assert_widths(rec)
    assert all(torch.equal(theta0[k], rec.init["target_network"][k]) for k in theta0)  # theta- = theta at the start
    clip, dual_clip = CLIPS.get((script, case), (f["clip"], 0.0))
    assert (clip, dual_clip) == (f["clip"], f["dual_clip"])

    idx = g["b"].idx  # the loop's last (here: only) Q minibatch
    b = batch(tr, idx)
    assert {2, 6, 11} <= set(idx.tolist())  # terminal, time-out, capped: all in the Q minibatch
    v = next_value(script, theta0, mixer0, b)

    eta = None
    if tv:
        (dual_step,) = rec.dual_steps()
        xi0 = rec.init["dual_network"]
        dual_idx = g["dual_b"].idx
        bd = batch(tr, dual_idx)
        assert 2 in set(dual_idx.tolist()) and len(set(dual_idx.tolist()) & {6, 11}) > 0
        vd = next_value(script, theta0, mixer0, bd)
        _, dgrads, dnorm = dual_prediction(xi0, vd, bd, f, f["squared"], f["clamp"], dual_clip)
        assert not dual_clip or dnorm > dual_clip, (dnorm, dual_clip)
        assert_grads({k[1]: v_ for k, v_ in dual_step["grad"].items()}, dgrads, "dual grad")
        dmove = first_step(dgrads, "adam", a.dual_learning_rate)
        assert_moves(xi0, g["dual_network"].state_dict(), dmove, "dual move", a.dual_learning_rate)
        xi1 = {k: xi0[k] + dmove[k] for k in xi0}
        with torch.no_grad():
            raw = dual_eta(xi1, b["state"], b["actions"])
            eta_max = 2.0 / (f["rho"] * (1.0 - f["gamma"]))
            if case == "upper-clamp":  # Eq. (10)'s upper end binds on part of the batch
                assert (raw > eta_max).any() and (raw < eta_max).any(), (raw, eta_max)
            else:  # the clamp's floor (0, or m with batch-min) matters on this batch
                assert (raw < worst_value(f, v, b["terminated"])).any()
            eta = clamp_eta(raw, f, v, b["terminated"])
    y = target_y(script, b, v, eta, f)
    torch.testing.assert_close(rec.targets[-1], y, rtol=1e-5, atol=1e-5)

    grads, norm = q_prediction(script, theta0, mixer0, y, b, clip)
    assert (norm > clip) if (script, case) in CLIPS else (norm < clip or clip == 0), (norm, clip)
    (step,) = rec.q_steps()
    assert_grads(step["grad"], grads, "Q grad")
    move = first_step(grads, f["optimizer"], LR)
    final = {("q_network", k): v_ for k, v_ in g["q_network"].state_dict().items()}
    init = {("q_network", k): v_ for k, v_ in theta0.items()}
    if mixer0 is not None:
        final |= {("mixer", k): v_ for k, v_ in g["mixer"].state_dict().items()}
        init |= {("mixer", k): v_ for k, v_ in mixer0.items()}
    assert final.keys() == move.keys()  # every parameter of the agents and of the mixer is stepped
    assert_moves(init, final, move, "Q move", LR)

    # Plausible wrong computations predict gradients the loop did not produce.
    wrong = {
        "truncation as terminal": target_y(script, b, v, eta, f, time_limit_terminal=True),
        "unmasked max": target_y(script, b, next_value(script, theta0, mixer0, b, masked=False), eta, f),
    }
    if tv:
        with torch.no_grad():
            wrong["eta clamp flipped"] = target_y(script, b, v, clamp_eta(raw, f, v, b["terminated"], not f["clamp"]), f)
            wrong["eta of the dual net before its step"] = target_y(
                script, b, v, clamp_eta(dual_eta(xi0, b["state"], b["actions"]), f, v, b["terminated"]), f
            )
            if case == "upper-clamp":
                wrong["eta clamped at 0 only (no upper end)"] = target_y(script, b, v, raw.clamp(min=0.0), f)
        recorded = {k[1]: v_ for k, v_ in dual_step["grad"].items()}
        assert_distinct(
            recorded, dual_prediction(xi0, vd, bd, f, not f["squared"], f["clamp"], dual_clip)[1], "dual loss kind"
        )
        assert_distinct(recorded, dual_prediction(xi0, vd, bd, f, f["squared"], not f["clamp"], dual_clip)[1], "dual clamp")
        live_all = dict(bd, terminated=torch.zeros_like(bd["terminated"]))
        assert_distinct(
            recorded,
            dual_prediction(xi0, vd, live_all, f, f["squared"], f["clamp"], dual_clip)[1],
            "terminated transitions in the dual loss",
        )
    elif f["rho"] > 0:
        wrong["rho dropped"] = b["reward"] + f["gamma"] * (1.0 - b["terminated"]) * v
    else:  # plain VDN (--rho 0): a loop that used some other rho (e.g. the default radius of another script)
        wrong["rho not the flag's"] = target_y(script, b, v, None, dict(f, rho=RHO))
    if f["worst"] == "batch-min":
        live_v, zero = v * (1.0 - b["terminated"]), dict(f, worst="zero")
        assert live_v.min() < 0  # m < 0 on this batch: the batch-min target is not the zero one
        if tv:
            with torch.no_grad():
                wrong["m dropped (min V = 0)"] = target_y(script, b, v, clamp_eta(raw, zero, v, b["terminated"]), zero)
            assert_distinct(
                recorded,
                dual_prediction(xi0, vd, bd, zero, f["squared"], f["clamp"], dual_clip)[1],
                "m dropped from the dual loss",
            )
        else:
            wrong["m dropped (min V = 0)"] = target_y(script, b, v, None, zero)
            wrong["m without gamma (Eq. 28 as printed)"] = b["reward"] + (1.0 - b["terminated"]) * (
                f["gamma"] * (1.0 - f["rho"]) * v + f["rho"] * live_v.min()
            )
            wrong["m over V' not zeroed at a terminal state"] = b["reward"] + f["gamma"] * (1.0 - b["terminated"]) * (
                (1.0 - f["rho"]) * v + f["rho"] * v.min()
            )
    for name, y_wrong in wrong.items():
        bad, _ = q_prediction(script, theta0, mixer0, y_wrong, b, clip)
        assert_distinct(step["grad"], bad, name)
    if not is_vdn(script):
        p = leaves(theta0)
        q = agent_q(p, b["obs_w"], b["prev_w"]).gather(-1, b["actions"][..., None]).squeeze(-1)
        vdn_loss = ((q.sum(-1) - y) ** 2).mean()
        vdn_grads = dict(zip(p, torch.autograd.grad(vdn_loss, list(p.values()))))
        vdn_grads, _ = clipped(vdn_grads, clip)
        assert_distinct(step["grad"], {("q_network", k): x for k, x in vdn_grads.items()}, "sum instead of the mixer")


# ------------------------------------------------------------------------------------------------
# 2. frozen target (and the hard copy)
# ------------------------------------------------------------------------------------------------
N_LONG_UPDATES = 13  # 36 env steps, learning from step 10, one update every 2 steps: steps 12, 14, .., 36


def update_index(env_step: int) -> int:
    """Which gradient step (0-based) the loop makes at env step 12, 14, ..."""
    return (env_step - 12) // 2


def split(params: dict) -> tuple[dict, dict | None]:
    """{(module, name): tensor} -> (agents' state dict, mixer's state dict or None)."""
    agents = {k[1]: v for k, v in params.items() if k[0] == "q_network"}
    mixer = {k[1]: v for k, v in params.items() if k[0] == "mixer"}
    return agents, (mixer or None)


def cached_values(rec: Recording, script: str, tr: dict, agents: dict, mixer: dict | None, version: int):
    """(the cached V' of every slot cached for target version `version`, ours with the given target weights
    (0 at a terminated transition), the slots)."""
    rb = rec.g["rb"]
    slots = np.flatnonzero(rb.value_version[: rb.size] == version)
    b = batch(tr, slots)
    ours = next_value(script, agents, mixer, b) * (1.0 - b["terminated"])
    return torch.from_numpy(rb.next_value[slots]), ours, slots


def check_last_update(rec: Recording, script: str, tr: dict, target: dict, target_mixer: dict | None):
    """The last update of a run, from the weights it started from (recorded before the step): its TD target
    and its gradients (dual, then Q) are ours with V' from the given target weights. Returns a function that
    gives the Q gradients predicted from any other target weights."""
    g, f = rec.g, flags_of(rec)
    q_step = rec.q_steps()[-1]
    agents, mixer = split(q_step["before"])
    b = batch(tr, g["b"].idx)
    raw = None
    if is_tv(script):
        dual_step = rec.dual_steps()[-1]
        bd = batch(tr, g["dual_b"].idx)
        xi_before = {k[1]: v for k, v in dual_step["before"].items()}
        _, dgrads, _ = dual_prediction(
            xi_before, next_value(script, target, target_mixer, bd), bd, f, f["squared"], f["clamp"], f["dual_clip"]
        )
        assert_grads({k[1]: v for k, v in dual_step["grad"].items()}, dgrads, "last dual grad")
        xi_after = {k[1]: v for k, v in dual_step["after"].items()}
        with torch.no_grad():
            raw = dual_eta(xi_after, b["state"], b["actions"])

    def predicted(t_agents, t_mixer):
        v = next_value(script, t_agents, t_mixer, b)
        eta = None if raw is None else clamp_eta(raw, f, v, b["terminated"])
        y = target_y(script, b, v, eta, f)
        return y, q_prediction(script, agents, mixer, y, b, f["clip"])[0]

    y, grads = predicted(target, target_mixer)
    torch.testing.assert_close(rec.targets[-1], y, rtol=1e-5, atol=1e-5)
    assert_grads(q_step["grad"], grads, "last Q grad")
    return lambda t_agents, t_mixer: predicted(t_agents, t_mixer)[1]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_frozen_target_bootstraps_from_the_initial_weights(runs, script):
    """36 env steps, 13 updates, --target-network-frequency 10^9: theta- is never copied, so every cached
    V' = Q_tot(h', a_bar'; theta-) and the last update's target and gradients (dual and Q) are those of the
    *initial* weights theta_0 (agents and mixer), while the online network has moved: recomputed with the
    online weights (a bootstrap from the online network) the cache and the gradients do not match."""
    rec = runs(script, "frozen")
    g = rec.g
    assert len(rec.q_steps()) == N_LONG_UPDATES and g["rb"].version == 0  # 13 gradient steps, no hard copy
    tr = transitions(rec.task)
    theta0, mixer0 = rec.init["q_network"], rec.init.get("mixer")
    for name, online_name in (("target_network", "q_network"), ("target_mixer", "mixer")):
        if name in g:  # the target at the end = the initial online weights, bit for bit
            assert all(torch.equal(v, rec.init[online_name][k]) for k, v in g[name].state_dict().items()), name
    online, online_mixer = split(rec.q_steps()[-1]["before"])
    assert max_diff(online, theta0) > 1e-3  # the online network did move

    cached, ours, slots = cached_values(rec, script, tr, theta0, mixer0, version=0)
    assert len(slots) == g["rb"].size == 36  # every slot got a value for theta_0
    torch.testing.assert_close(cached, ours, rtol=1e-5, atol=1e-5)
    b = batch(tr, slots)
    from_online = next_value(script, online, online_mixer, b) * (1.0 - b["terminated"])
    assert (from_online - ours).abs().max() > 1e-3

    other = check_last_update(rec, script, tr, theta0, mixer0)
    assert_distinct(rec.q_steps()[-1]["grad"], other(online, online_mixer), "bootstrap from the online network")


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_hard_copy_every_8_steps_puts_the_online_weights_in_the_target(runs, script):
    """--target-network-frequency 8 over 36 steps: copies at env steps 8, 16, 24, 32 (target version 4). The
    last copy comes right after the update of step 32, so theta- (agents and mixer) = the online weights after
    that update; the values cached since (version 4) and the last update's target and gradients use them, not
    the weights of the copy before (version 3, after the update of step 24) nor theta_0."""
    rec = runs(script, "copy8")
    g = rec.g
    assert len(rec.q_steps()) == N_LONG_UPDATES and g["rb"].version == 4  # 13 gradient steps, 4 hard copies
    tr = transitions(rec.task)
    steps = rec.q_steps()
    last_copy, previous_copy = (split(steps[update_index(s)]["after"]) for s in (32, 24))
    agents, mixer = last_copy
    assert all(torch.equal(v, agents[k]) for k, v in g["target_network"].state_dict().items())
    if mixer is not None:
        assert all(torch.equal(v, mixer[k]) for k, v in g["target_mixer"].state_dict().items())
    cached, ours, slots = cached_values(rec, script, tr, agents, mixer, version=4)
    assert len(slots) > 0
    torch.testing.assert_close(cached, ours, rtol=1e-5, atol=1e-5)
    other = check_last_update(rec, script, tr, agents, mixer)
    assert_distinct(steps[-1]["grad"], other(*previous_copy), "a stale cache (the copy before)")
    assert_distinct(steps[-1]["grad"], other(rec.init["q_network"], rec.init.get("mixer")), "a target never copied")


@pytest.mark.parametrize("script,case", [("vdn_tv", "schedule-paper-dual"), ("qmix_tv", "schedule-released-dual")])
def test_released_schedule_makes_four_dual_then_four_q_steps(runs, script, case):
    """--update-schedule released (the released TV trainers: every 8 env steps, 4 dual-network steps, then 4 Q steps,
    each on its own minibatch; docs item 11). 19 env steps, learning from step 10, --train-frequency 2: one training
    step, at env step 16 (none at 12, 14, 18), the optimisers stepping dual x 4, then Q x 4. The 8 minibatches are the
    8 consecutive parts of the one draw of 8 x 16 slots (the loop's last dual_b and b: parts 4 and 8). Each dual step's
    gradient is Eq. (17) on its own part at the weights it started from (V' of theta_0), the first one's move the
    closed-form first Adam step; every Q step's target y takes eta of the dual network after all four dual steps,
    and its gradients are ours from its own part and the weights before it. Wrong orders predict other gradients:
    eta of the dual network after one dual step (the paper's 1 + 1 interleaving), or every Q step on the first Q
    minibatch."""
    rec = runs(script, case)
    g, f, a = rec.g, flags_of(rec), rec.g["args"]
    assert g["global_step"] == 19 and [s["which"] for s in rec.steps] == ["dual"] * 4 + ["q"] * 4
    tr = transitions(rec.task)
    theta0, mixer0 = rec.init["q_network"], rec.init.get("mixer")
    (drawn,) = [d[2] for d in rec.draws if d[0] == "integers" and np.shape(d[2]) == (8 * a.batch_size,)]
    parts = np.split(drawn, 8)
    assert len({tuple(p) for p in parts}) == 8 and set(drawn) <= set(range(16))  # 8 minibatches of the 16 stored at step 16
    np.testing.assert_array_equal(g["dual_b"].idx, parts[3])
    np.testing.assert_array_equal(g["b"].idx, parts[7])
    duals, qs = rec.dual_steps(), rec.q_steps()
    for k, step in enumerate(duals):  # each dual step: its own minibatch, from the weights it started from
        xi = {n[1]: v_ for n, v_ in step["before"].items()}
        bd = batch(tr, parts[k])
        _, dgrads, _ = dual_prediction(
            xi, next_value(script, theta0, mixer0, bd), bd, f, f["squared"], f["clamp"], f["dual_clip"]
        )
        assert_grads({n[1]: v_ for n, v_ in step["grad"].items()}, dgrads, f"dual step {k + 1}")
        if k == 0:
            assert_moves(
                xi,
                {n[1]: v_ for n, v_ in step["after"].items()},
                first_step(dgrads, "adam", a.dual_learning_rate),
                "dual move",
                a.dual_learning_rate,
            )
        if k < 3:
            assert all(torch.equal(step["after"][n], duals[k + 1]["before"][n]) for n in step["after"])
    xi4 = {n[1]: v_ for n, v_ in duals[-1]["after"].items()}
    assert all(torch.equal(xi4[n], v_) for n, v_ in g["dual_network"].state_dict().items())

    def predicted(k, xi, part):
        """(y, Q gradients) of Q step k on minibatch `part` with eta of dual weights xi."""
        agents, mixer = split(qs[k]["before"])
        b = batch(tr, part)
        v = next_value(script, theta0, mixer0, b)
        with torch.no_grad():
            eta = clamp_eta(dual_eta(xi, b["state"], b["actions"]), f, v, b["terminated"])
        y = target_y(script, b, v, eta, f)
        return y, q_prediction(script, agents, mixer, y, b, f["clip"])[0]

    for k, step in enumerate(qs):  # each Q step: its own minibatch, eta after all four dual steps
        y, grads = predicted(k, xi4, parts[4 + k])
        torch.testing.assert_close(rec.targets[k], y, rtol=1e-5, atol=1e-5)
        assert_grads(step["grad"], grads, f"Q step {k + 1}")
        if k < 3:
            assert all(torch.equal(step["after"][n], qs[k + 1]["before"][n]) for n in step["after"])
    xi1 = {n[1]: v_ for n, v_ in duals[0]["after"].items()}
    assert_distinct(qs[0]["grad"], predicted(0, xi1, parts[4])[1], "eta after one dual step (1 + 1 interleaved)")
    assert_distinct(qs[1]["grad"], predicted(1, xi4, parts[4])[1], "every Q step on the first Q minibatch")


# ------------------------------------------------------------------------------------------------
# 3. time limits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,case", list(ONE_UPDATE))
def test_time_limits_bootstrap_and_true_ends_do_not(runs, script, case):
    """The first 12 transitions: slot 2 ends the terminal episode (terminated=1), slot 6 is the task's own
    time-out (truncated=1, terminated=0: building's end of day, SMAX's time-out), slot 11 is cut by the
    --episode-steps cap (the task said nothing: truncated=1, terminated=0). The stored flags say exactly that,
    and the TD target the loop built at each of them (F.mse_loss's target) is, with our V' (theta_0) and eta
    (the dual network after its step): r + gamma * bootstrap at the two time limits -- a bootstrap that is not
    negligible (at one slot of VDN-TV's clamped case it is exactly 0: eta at its floor, V' > 0) -- and r at the
    terminal one. Every one-update case, so both dual losses, both clamps and both optimisers."""
    rec = runs(script, case)
    g, rb, f = rec.g, rec.g["rb"], flags_of(rec)
    tr = transitions(rec.task)
    assert [ep["kind"] for ep in rec.task.episodes] == ["terminal", "timeout", "capped"]
    assert rec.task.episodes[1]["truncated"][-1] and not any(rec.task.episodes[2]["truncated"])  # the cap cut ep. 2
    expect_term = np.zeros(12, np.float32)
    expect_term[2] = 1
    expect_trunc = np.zeros(12, np.float32)
    expect_trunc[[6, 11]] = 1
    assert rb.size == 12
    np.testing.assert_array_equal(rb.terminated[:12], expect_term)
    np.testing.assert_array_equal(rb.truncated[:12], expect_trunc)

    idx = g["b"].idx
    b = batch(tr, idx)
    v = next_value(script, rec.init["q_network"], rec.init.get("mixer"), b)
    eta = None
    if is_tv(script):
        with torch.no_grad():
            eta = clamp_eta(dual_eta(g["dual_network"].state_dict(), b["state"], b["actions"]), f, v, b["terminated"])
    boot = f["gamma"] * bootstrap(script, v, eta, f, b["terminated"])
    y, seen = rec.targets[-1], 0
    for slot in (6, 11):
        at = torch.from_numpy(idx == slot)
        assert at.any()
        torch.testing.assert_close(y[at], b["reward"][at] + boot[at], rtol=1e-5, atol=1e-5)
        # the bootstrap is visible, unless eta sits at Eq. (10)'s floor 0 with V' >= 0: then Eq. (16) gives min(V', 0) = 0
        at_floor = eta is not None and f["clamp"] and bool((eta[at] == 0).all() and (v[at] >= 0).all())
        assert boot[at].abs().min() > 1e-3 or at_floor, (slot, boot[at])
        seen += int(boot[at].abs().min() > 1e-3)
    assert seen >= 1
    at = torch.from_numpy(idx == 2)
    assert at.any()
    torch.testing.assert_close(y[at], b["reward"][at], rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 4. unavailable actions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_no_unavailable_action_is_taken_or_bootstrapped(runs, script):
    """Only 2 of the 5 actions are available to each agent at each step. (a) Exploration: the one-update runs
    act with epsilon ~ 1 (uniform over available actions), the frozen run greedily (epsilon 0): the task never
    received an unavailable action. (b) Every greedy action is the masked argmax of Q_i(h_i, .) of the online
    network in force at that step (theta_0 until the first update, then the weights after the latest one),
    and at many steps the unmasked argmax is unavailable (so an unmasked greedy action would be caught).
    (c) The stored next-step masks are the task's, and every cached V' is the masked max (of theta_0, frozen
    target), which differs from the unmasked max."""
    for case in [c for s, c in ONE_UPDATE if s == script] + ["frozen"]:
        rec = runs(script, case)
        assert rec.task.violations == [], (case, rec.task.violations[:5])
        assert len(rec.task.episodes) in (3, 9)

    rec = runs(script, "frozen")
    tr = transitions(rec.task)
    steps, theta0 = rec.q_steps(), rec.init["q_network"]
    n_unmasked_bad, n_checked = 0, 0
    for j in range(len(tr["reward"])):
        n_done = 0 if j < 12 else update_index(j) + 1  # updates made before action j (the one of step 12 follows action 11)
        params = theta0 if n_done == 0 else split(steps[n_done - 1]["after"])[0]
        with torch.no_grad():
            q = agent_q(params, torch.from_numpy(tr["obs_w"][j][:, None]), torch.from_numpy(tr["prev_w"][j][:, None]))[0]
        avail = torch.from_numpy(tr["avail"][j])
        masked = q.masked_fill(~avail, -float("inf"))
        top2 = masked.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # no near-tie between the two available actions
        taken = torch.from_numpy(tr["actions"][j])
        assert torch.equal(taken[clear], masked.argmax(-1)[clear]), (j, taken, masked)
        n_checked += int(clear.sum())
        n_unmasked_bad += int((~avail.gather(-1, q.argmax(-1, keepdim=True))).sum())
    assert n_checked >= 0.95 * 36 * N_AGENTS and n_unmasked_bad >= 10, (n_checked, n_unmasked_bad)

    rb = rec.g["rb"]
    np.testing.assert_array_equal(rb.next_avail[: rb.size], tr["next_avail"])
    cached, ours, slots = cached_values(rec, script, tr, theta0, rec.init.get("mixer"), version=0)
    torch.testing.assert_close(cached, ours, rtol=1e-5, atol=1e-5)
    b = batch(tr, slots)
    unmasked = next_value(script, theta0, rec.init.get("mixer"), b, masked=False) * (1.0 - b["terminated"])
    assert (unmasked - ours).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# 5. acting: seeds, history windows, the epsilon schedule, the draws
# ------------------------------------------------------------------------------------------------
def expected_epsilon(a, step: int) -> float:
    """Linear decay from --start-e to --end-e over --exploration-steps env steps, then --end-e."""
    return max(a.start_e + (a.end_e - a.start_e) * step / a.exploration_steps, a.end_e)


def update_steps(a, n_steps: int) -> list[int]:
    """The env steps (1-based counts) after which the loop makes a gradient step: past --learning-starts, every
    --train-frequency steps."""
    return [s for s in range(1, n_steps + 1) if s > a.learning_starts and s % a.train_frequency == 0]


@pytest.mark.parametrize("script,case", [*ONE_UPDATE, *((s, "copy8") for s in SCRIPTS)])
def test_acting_follows_the_history_the_epsilon_schedule_and_the_seeded_draws(runs, script, case):
    """Everything that decides an action, from the run's records. (a) Seeding: torch's initial seed, the python
    and numpy global generators (as random.seed / np.random.seed leave them), the numpy Generator of days,
    exploration and minibatches, and the task (envs.make_env's seed) all come from --seed. (b) The online network
    acts (one q_network.greedy_q call per env step) on the window of the last W observations and previous actions
    of this episode (zeros / action 0 before its start), rebuilt here from the task's log, and its Q-values are
    those of the weights in force (theta_0, then the weights after the latest update). (c) The Generator's draws
    come in the loop's order: a training day uniform on --train-days at each episode start (the day the task was
    reset to), at each step an (N, A) uniform draw whose argmax over the available actions is the random action
    and one coin per agent (one shared coin with --single-coin), and a minibatch draw of --batch-size indices
    (TV: 2 x, the dual half first) on [0, size) at each update (the last one = the recorded idx). (d) The action
    of agent i is the random one where its coin < epsilon(step) (the loop's epsilon, read at its acting call, is
    asserted to be the schedule's value), epsilon decaying linearly from --start-e to
    --end-e over --exploration-steps env steps (copy8: 1 -> 0.05 over 24 steps, so both branches occur), else the
    masked greedy one (checked where the two best available Q-values are not near-tied)."""
    rec = runs(script, case)
    a, tr, task = rec.g["args"], transitions(rec.task), rec.task
    torch_seed, py_state, np_state = rec.seeds
    assert torch_seed == a.seed and py_state == random.Random(a.seed).getstate()
    ref = np.random.RandomState(a.seed).get_state()
    assert np_state[0] == ref[0] and np.array_equal(np_state[1], ref[1]) and np_state[2:] == ref[2:]
    assert rec.rng_seed == a.seed and rec.env_kwargs.get("seed") == a.seed

    n = len(tr["reward"])
    updates, steps, theta0 = update_steps(a, n), rec.q_steps(), rec.init["q_network"]
    assert len(updates) == len(steps) and len(rec.acting) == n
    lo, hi = (int(x) for x in a.train_days.split(":"))
    n_batch = (2 if is_tv(script) else 1) * a.batch_size
    draws = iter(rec.draws)

    def draw(name, shape=None, bounds=None):
        got = next(draws, None)
        assert got is not None and got[0] == name, (name, got)
        assert shape is None or got[2].shape == shape, (name, got[2].shape, shape)
        assert bounds is None or tuple(got[1]) == bounds, (name, got[1], bounds)
        return got[2]

    j, n_random, n_greedy = 0, 0, 0
    for ep in task.episodes:
        assert int(draw("integers", (), (lo, hi))) == ep["day"]
        for t in range(len(ep["actions"])):
            obs_w, prev_w, q_acted, epsilon = rec.acting[j]
            assert epsilon == pytest.approx(expected_epsilon(a, j), rel=1e-9, abs=1e-12), (j, epsilon)
            np.testing.assert_array_equal(obs_w[:, 0].numpy(), tr["obs_w"][j])
            np.testing.assert_array_equal(prev_w[:, 0].numpy(), tr["prev_w"][j])
            n_done = sum(u <= j for u in updates)  # updates made before the action of step j
            params = theta0 if n_done == 0 else split(steps[n_done - 1]["after"])[0]
            with torch.no_grad():
                q = agent_q(params, torch.from_numpy(tr["obs_w"][j][:, None]), torch.from_numpy(tr["prev_w"][j][:, None]))[0]
            torch.testing.assert_close(q_acted[0], q, rtol=1e-5, atol=1e-5)

            avail, taken = tr["avail"][j], tr["actions"][j]
            uniform = draw("random", (N_AGENTS, N_ACTIONS))
            coins = draw("random", (1,) if a.single_coin else (N_AGENTS,))
            explore = np.broadcast_to(coins, (N_AGENTS,)) < epsilon
            random_actions = np.argmax(uniform * avail, axis=1)
            masked = q.masked_fill(~torch.from_numpy(avail), -float("inf"))
            top2 = masked.topk(2, -1).values
            clear = ((top2[:, 0] - top2[:, 1]) > 1e-5).numpy()
            greedy = masked.argmax(-1).numpy()
            np.testing.assert_array_equal(taken[explore], random_actions[explore], err_msg=f"step {j}: exploring agents")
            np.testing.assert_array_equal(
                taken[~explore & clear], greedy[~explore & clear], err_msg=f"step {j}: greedy agents"
            )
            n_random, n_greedy = n_random + int(explore.sum()), n_greedy + int((~explore & clear).sum())
            j += 1
            if j in updates:
                idx = draw("integers", (n_batch,), (0, j))
                if j == updates[-1]:
                    np.testing.assert_array_equal(
                        idx, np.concatenate([rec.g["dual_b"].idx, rec.g["b"].idx]) if is_tv(script) else rec.g["b"].idx
                    )
    assert next(draws, None) is None  # nothing else drawn
    if case == "copy8":  # both branches of epsilon-greedy are exercised
        assert n_random >= 20 and n_greedy >= 20, (n_random, n_greedy)
