"""Robust VDN with a total-variation (TV) uncertainty set: paper Algorithm 5, one file.

    python algos/robust_vdn_tv.py --rho 0.5 --env building

Q_tot(h, a) = sum_i Q_i(h_i, a_i) (Thm. 2, VDN condition)
is trained towards the robust target of Eq. (16): y = r + gamma * (1 - rho) * eta - gamma * [eta - V']_+,
V' = Q_tot(h', a_bar'; theta-), a_bar'_i = argmax Q_i(h'_i; theta-), with eta = eta_xi(s, a) from a dual
network trained on Eq. (17) (Alg. 5 l.12-14). Docs: docs/vdn.md (usage, metrics, implementation details).
"""

import functools
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # the tasks (building, StarCraft, matrix games) and the agents' acting window (History)
import eval as evaluation  # StarCraft win-rate evaluation during training
import fused  # per-agent layers and C++ kernels (the agents' LSTMs in one call, RMSprop in one pass)
import runs  # run plumbing: flags, run folder, checkpoint / resume, Ctrl-C, NaN guard, progress, logging


@dataclass
class Args(runs.RunArgs, envs.EnvArgs):  # + the run flags (--seed, --resume, ...) and the task flags (--env, ...)
    # Algorithm (paper F.2 defaults)
    total_episodes: int = 600
    """number of training episodes E (Alg. 5 l.6)"""
    rho: float = 0.5
    """TV radius in [0, 1] (Eq. 9; the paper's best VDN-TV: 0.5)"""
    gamma: float = 0.997
    """discount factor (F.1: 1/(1-gamma) = 288)"""
    learning_rate: float = 5e-4
    """RMSprop learning rate of the agent networks"""
    buffer_size: int = 10_000
    """replay capacity in transitions"""
    batch_size: int = 64
    """transitions per gradient step"""
    train_frequency: int = 2
    """one gradient step every this many env steps"""
    learning_starts: int = 64
    """env steps before the first gradient step (paper silent: once a batch is stored)"""
    target_network_frequency: int = 25_000
    """env steps between hard copies theta- <- theta (Alg. 5 l.22)"""
    start_e: float = 1.0
    """initial epsilon"""
    end_e: float = 0.01
    """final epsilon"""
    exploration_steps: int = 120_000
    """env steps over which epsilon decays linearly"""
    hidden_dim: int = 64
    """width of the agent MLP and LSTM"""
    window: int = 8
    """history window: the last this many (obs, previous action) pairs"""
    max_grad_norm: float = 0.0
    """gradient-norm clip, 0 = none (paper silent; released VDN: none, QMIX/QTRAN 10, QTRAN-TV 1)"""
    rmsprop_eps: float = 1e-5
    """RMSprop epsilon (paper silent; released code: 1e-5, torch's default is 1e-8)"""
    dual_learning_rate: float = 1e-3
    """Adam learning rate of the dual network eta_xi (paper F.2)"""
    dual_max_grad_norm: float = 0.0
    """gradient-norm clip of the dual update, 0 = none (paper silent; released: none here, 1.0 in QTRAN-TV)"""
    dual_hidden_dim: int = 64
    """width of the dual network's layers"""

    # Released-code switches (docs/index.md, "Two configurations"; the paper's choice is the default)
    dual_loss: Literal["linear", "squared"] = "linear"
    """linear (Eq. 17) or squared (released code: the mean of the square of Eq. 17's term)"""
    eta_clamp: bool = True
    """clamp eta to Eq. (10)'s [0, 2/(rho(1-gamma))] in the dual loss and the target (released code: never)"""
    single_coin: bool = False
    """one epsilon coin for all agents (released code) instead of one per agent (Alg. 5 l.9)"""
    update_schedule: Literal["paper", "released"] = "paper"
    """paper: 1 dual then 1 Q step every --train-frequency env steps (Alg. 5, F.2); released: 4 then 4 every 4x as many"""

    # Beyond the paper
    worst_value: Literal["zero", "batch-min"] = "zero"
    """min V in Eq. (29): zero (Assumption 1/2, exactly Alg. 5) or batch-min (general operator)"""
    share_params: bool = False
    """one DRQN for all agents with an agent-id input (pymarl style) instead of one per agent"""


def check_args(args: Args) -> None:
    """One clear line naming the flag for every bad input, then exit != 0 (tyro checks the Literal choices)."""
    if not 0.0 <= args.rho <= 1.0:
        runs.fail(f"--rho must be in [0, 1] for the TV uncertainty set (got {args.rho}; 0 is the nominal model)")
    runs.check_run_args(args)  # --env, --train-config, --train-days, sizes


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


# --- Robust TD target and dual network (TV: Eq. 10, 16, 17, 29) ---
def eta_bounds(next_value, gamma, rho, worst_value="zero"):
    """Eq. (10): eta in [0, 2/(rho(1-gamma))], batch-min [m, m + 2/(rho(1-gamma))], m = min V'; rho = 0: no upper end."""
    lo = next_value.min() if worst_value == "batch-min" else next_value.new_zeros(())
    return lo, lo + (2.0 / (rho * (1.0 - gamma)) if rho > 0 else float("inf"))


def robust_target(reward, next_value, eta, terminated, gamma, rho, worst_value="zero"):
    """Alg. 5 l.19, Eq. (16): y = r + gamma * ((1 - rho) * eta - [eta - V']_+), V' = Q_tot(h', a_bar'; theta-); y = r where
    terminated. "batch-min" (Eq. 29, min V estimated by m = min V'): y = r + gamma (m + (1 - rho) (eta - m) - [eta - V']_+)."""
    m = next_value.min() if worst_value == "batch-min" else 0.0
    bootstrap = m + (1.0 - rho) * (eta - m) - F.relu(eta - next_value)
    return reward + gamma * (1.0 - terminated) * bootstrap


def dual_loss(eta, next_value, rho, worst_value="zero", kind="linear", weight=None, raw_eta=None):
    """Alg. 5 l.13, Eq. (17): mean([eta - V']_+ - (1 - rho) * eta) (batch-min: (1 - rho) * (eta - m)), weight 0 where
    terminated; "squared": the released code's square of the term; raw_eta: + (raw_eta - eta)^2 pulls eta into Eq. (10)."""
    m = next_value.min() if worst_value == "batch-min" else 0.0
    term = F.relu(eta - next_value) - (1.0 - rho) * (eta - m)
    term = term**2 if kind == "squared" else term
    if raw_eta is not None:
        term = term + (raw_eta - eta.detach()) ** 2
    weight = torch.ones_like(term) if weight is None else weight
    return (weight * term).sum() / weight.sum().clamp(min=1e-12)


class DualNetwork(nn.Module):
    """eta_xi(s, a) (paper F.2 "Dual networks", as released; input (s_t, a_t)): ReLU(Linear(s)) and
    ReLU(Linear(onehot(a_1)..onehot(a_N))) concatenated -> Linear -> ReLU -> Linear -> scalar."""

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.state_fc, self.action_fc = nn.Linear(state_dim, hidden_dim), nn.Linear(n_agents * n_actions, hidden_dim)
        self.fc, self.out = nn.Linear(2 * hidden_dim, hidden_dim), nn.Linear(hidden_dim, 1)
        self.register_buffer("offsets", torch.arange(n_agents) * n_actions, persistent=False)

    def forward(self, state, actions):
        """state (B, S), actions (B, N) long -> eta (B,); Linear(one-hot joint action) = sum of N weight columns."""
        a = F.embedding(actions + self.offsets, self.action_fc.weight.t()).sum(-2) + self.action_fc.bias
        return self.out(F.relu(self.fc(torch.cat([F.relu(self.state_fc(state)), F.relu(a)], -1)))).squeeze(-1)


# --- Agent network: one DRQN per agent, exactly as released (paper F.2 "Robust individual Q-networks") ---
class DRQN(nn.Module):
    """K DRQNs (paper F.2): fc1 = Linear(obs + onehot(prev action) [+ onehot(agent id)], 64) -> ReLU -> LSTM(64, 64)
    from a zero state over the window, last output -> ReLU -> fc_out = Linear(64, n_actions); fused.py stacks the K
    networks' weights (eval.agent_state_dict(drqn, k): network k in the released format, agent_{k}_q_network.pt)."""

    def __init__(self, n_nets: int, obs_dim: int, n_actions: int, hidden_dim: int, n_ids: int = 0, use_kernel=True):
        super().__init__()
        self.fc1 = fused.AgentsInput(n_nets, obs_dim, n_actions, n_ids, hidden_dim)
        self.lstm = fused.AgentsLSTM(n_nets, hidden_dim, use_kernel)
        self.fc_out = fused.AgentsLinear(n_nets, hidden_dim, n_actions)

    def forward(self, obs_w, prev_a_w, agent_ids=None):
        """obs_w (K, W, M, obs_dim), prev_a_w (K, W, M) long [, agent_ids (M,)] -> Q (K, M, n_actions), h_W (K, M, H)."""
        x = F.relu(self.fc1(obs_w, prev_a_w, agent_ids))
        h = self.lstm(x)
        return self.fc_out(F.relu(h)), h


class QNetworks(nn.Module):
    """The N agents' Q_i(h_i, .): per-agent DRQNs (default) or one shared DRQN (--share-params)."""

    def __init__(self, n_agents, obs_dim, n_actions, hidden_dim, share_params=False, use_kernel=True):
        super().__init__()
        self.n_agents, self.share_params = n_agents, share_params
        n_nets, n_ids = (1, n_agents) if share_params else (n_agents, 0)
        self.drqn = DRQN(n_nets, obs_dim, n_actions, hidden_dim, n_ids, use_kernel)
        self.register_buffer("ids", torch.arange(n_agents), persistent=False)

    def forward(self, obs_w, prev_a_w):
        """obs_w (W, B, N, obs_dim), prev_a_w (W, B, N) -> Q-values (B, N, n_actions)."""
        W, B, N = prev_a_w.shape
        if self.share_params:  # one DRQN; the N agents are N*B rows told apart by the id one-hot
            q, _ = self.drqn(obs_w.reshape(1, W, B * N, -1), prev_a_w.reshape(1, W, B * N), self.ids.repeat(B))
            return q.view(B, N, -1)
        q, _ = self.drqn(obs_w.permute(2, 0, 1, 3), prev_a_w.permute(2, 0, 1))  # agent k sees its own windows
        return q.transpose(0, 1)

    @torch.no_grad()
    def greedy_q(self, obs_w, prev_a_w):
        """forward() without gradients: acting and target values."""
        return self(obs_w, prev_a_w)


def masked_argmax(q, avail):
    """argmax over available actions only (unavailable actions never chosen)."""
    return q.masked_fill(~avail, -float("inf")).argmax(-1)


# --- Replay ---
class Batch:
    """Slots idx of a buffer as device tensors; history / next_history: the (obs, prev. action) windows ending at t / t + 1."""

    def __init__(self, rb, idx):
        self.rb, self.idx = rb, idx
        for name in ("state", "actions", "reward", "terminated", "next_state", "next_avail", "next_value"):
            setattr(self, name, torch.from_numpy(getattr(rb, name)[idx]).to(rb.device))

    @functools.cached_property
    def windows(self):
        return [torch.from_numpy(w).to(self.rb.device) for w in self.rb.windows(self.idx)]

    history = property(lambda self: self.windows[:2])  # (obs, previous action) windows ending at t
    next_history = property(lambda self: self.windows[2:])  # ... ending at t + 1


class ReplayBuffer:
    """D: each transition (o, s, a, r, o', s', avail', terminated, truncated) stored once with its step t in the episode
    (windows are gathered at sample time), and V' per slot, cached: theta- only changes at the hard copy."""

    def __init__(self, capacity, n_agents, obs_dim, state_dim, n_actions, window, device="cpu"):
        self.capacity, self.window, self.ptr, self.size, self.device = capacity, window, 0, 0, device
        self.obs, self.next_obs = np.zeros((2, capacity, n_agents, obs_dim), dtype=np.float32)
        self.state, self.next_state = np.zeros((2, capacity, state_dim), dtype=np.float32)
        self.actions, self.t = np.zeros((capacity, n_agents), dtype=np.int64), np.zeros(capacity, dtype=np.int64)
        self.next_avail = np.zeros((capacity, n_agents, n_actions), dtype=bool)
        self.reward, self.terminated, self.truncated = np.zeros((3, capacity), dtype=np.float32)
        self.next_value = np.zeros(capacity, dtype=np.float32)  # V' of theta- version value_version[slot]
        self.value_version = np.full(capacity, -1, dtype=np.int64)
        self.version = 0  # hard copies theta- <- theta so far

    def add(self, obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t):
        i = self.ptr
        self.obs[i], self.state[i], self.actions[i], self.reward[i] = obs, state, actions, reward
        self.next_obs[i], self.next_state[i], self.next_avail[i] = next_obs, next_state, next_avail
        self.terminated[i], self.truncated[i], self.t[i], self.value_version[i] = terminated, truncated, t, -1
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def target_changed(self):
        """theta- <- theta: every cached V' is stale."""
        self.version += 1

    def sample(self, batch_size, rng, next_values, n=1):
        """n minibatches of batch_size slots, drawn at once -> Batch (n = 1) or list; next_values(Batch): V' if not cached."""
        idx = self.sample_slots(n * batch_size, rng)
        todo = self.stale(idx)
        if len(todo):
            self.next_value[todo] = next_values(Batch(self, todo)).cpu().numpy()
            self.value_version[todo] = self.version
        batches = [Batch(self, part) for part in np.split(idx, n)]
        return batches[0] if n == 1 else batches

    def sample_slots(self, k, rng):
        """Uniform, with replacement (released: without; docs/vdn.md item 3), over stored slots whose window is intact."""
        if self.size < self.capacity:
            return rng.integers(0, self.size, k)
        return (self.ptr + rng.integers(self.window, self.capacity, k)) % self.capacity

    def stale(self, idx, newest=32):
        """Slots of idx without a cached V' for the current theta-, plus the stale ones of the `newest` latest slots."""
        todo = idx[self.value_version[idx] != self.version]
        if len(todo):
            recent = (self.ptr - 1 - np.arange(min(newest, self.size))) % self.capacity
            todo = np.union1d(todo, recent[self.value_version[recent] != self.version])
        return todo

    def windows(self, idx):
        """Windows ending at t and at t+1 of slots idx: obs (W, B, N, obs_dim), previous actions (W, B, N), twice."""
        d = np.arange(1 - self.window, 1)  # offsets -(W-1) .. 0
        src = (idx[None, :] + d[:, None]) % self.capacity  # (W, B)
        tau = self.t[idx][None, :] + d[:, None]  # time step of each window position
        obs_w = np.where((tau >= 0)[..., None, None], self.obs[src], 0.0).astype(np.float32)
        prev_w = np.where((tau >= 1)[..., None], self.actions[(src - 1) % self.capacity], 0)
        next_obs_w = np.concatenate([obs_w[1:], self.next_obs[idx][None]], 0)
        next_prev_w = np.concatenate([prev_w[1:], self.actions[idx][None]], 0)
        return obs_w, prev_w, next_obs_w, next_prev_w


@torch.no_grad()
def target_values(b, target_network):
    """V' = Q_tot(h', a_bar'; theta-) = sum_i max_{a available} Q_i(h'_i, a; theta-) (Alg. 5 l.16, l.18) of Batch b.
    Terminal next state (terminated transition): V' = 0, its value; --worst-value batch-min's m sees it."""
    q_next = target_network.greedy_q(*b.next_history)
    value = q_next.masked_fill(~b.next_avail, -float("inf")).max(-1).values.sum(-1)
    return torch.where(b.terminated > 0, 0.0, value)  # y bootstraps nothing there either


if __name__ == "__main__":
    args = runs.parse_args(Args, __file__, check_args)  # --resume runs/<name>: that run's flags; one line per bad flag
    starcraft = envs.apply_env_defaults(args, Args)  # StarCraft: SMAC-literature values (envs.py)
    run_name = args.run_name or f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join("runs", run_name)
    run = runs.Run(run_dir, args, __file__)  # the run folder: args.json, TensorBoard (continued on --resume)

    # Seeding: python, numpy, torch and the environment (days, exploration) from one --seed
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = runs.torch_setup(args)  # deterministic algorithms, --torch-threads, --device

    # Environment
    env = envs.make_env(args.env, args.train_config, seed=args.seed)
    N, A = env.n_agents, env.n_actions
    episode_steps = min(args.episode_steps or env.episode_limit, env.episode_limit)
    day_lo, day_hi = (int(x) for x in args.train_days.split(":"))

    # Alg. 5 l.3, l.5: Q_i with parameters theta, target theta- = theta
    q_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    params = list(q_network.parameters())
    optimizer = fused.RMSprop(params, lr=args.learning_rate, eps=args.rmsprop_eps, use_kernel=args.fused)
    target_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    target_network.load_state_dict(q_network.state_dict())
    next_values = functools.partial(target_values, target_network=target_network)  # V' of a Batch
    # Alg. 5 l.4: dual network eta_xi with parameters xi, its own Adam (paper F.2)
    dual_network = DualNetwork(env.state_dim, N, A, args.dual_hidden_dim).to(device)
    dual_optimizer = torch.optim.Adam(dual_network.parameters(), lr=args.dual_learning_rate, fused=True)
    max_norm, dual_max_norm = args.max_grad_norm or float("inf"), args.dual_max_grad_norm or float("inf")  # inf: measured only
    n_updates = 4 if args.update_schedule == "released" else 1  # dual steps, then Q steps, per training step

    # Alg. 5 l.2: replay buffer D
    rb = ReplayBuffer(args.buffer_size, N, env.obs_dim, env.state_dim, A, args.window, device)
    history = envs.History(1, args.window, N, env.obs_dim)  # acting: each agent's last W (obs, prev. action)

    def dual_eta(b):
        """eta_xi(s, a) of Batch b: (raw, clamped to Eq. (10)'s range); --no-eta-clamp (released code): raw."""
        eta = dual_network(b.state, b.actions)
        return eta, (eta.clamp(*eta_bounds(b.next_value, args.gamma, args.rho, args.worst_value)) if args.eta_clamp else eta)

    run.track(q_network=q_network, target_network=target_network, optimizer=optimizer, rb=rb, rng=rng)  # --resume: restored
    run.track(dual_network=dual_network, dual_optimizer=dual_optimizer)  # at `with run`
    global_step = run.global_step
    with run:  # Ctrl-C / SIGTERM: checkpoint at the episode's end; a non-finite gradient: one error line
        for episode in range(run.episode, args.total_episodes):  # Alg. 5 l.6
            day = episode if starcraft else int(rng.integers(day_lo, day_hi))  # StarCraft: episode id
            obs, state, avail = env.reset(day)  # Alg. 5 l.7
            history.reset(obs[None])
            episode_return, episode_start = 0.0, global_step
            for t in range(episode_steps):  # Alg. 5 l.8
                # Alg. 5 l.9: each agent picks its action epsilon-greedily (masked to available actions)
                epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step)
                q = q_network.greedy_q(*history.tensors(device))[0]  # no_grad inside
                greedy = masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
                random_actions = np.argmax(rng.random((N, A)) * avail, axis=1)  # uniform over available
                coins = rng.random(1).repeat(N) if args.single_coin else rng.random(N)
                actions = np.where(coins < epsilon, random_actions, greedy)

                # Alg. 5 l.10: step the joint action
                next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(actions)
                truncated = truncated or t == episode_steps - 1
                episode_return += reward
                # Alg. 5 l.11: store (h, a, r, h'); windows are rebuilt from single transitions
                rb.add(obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t)
                history.push(next_obs[None], actions[None])
                obs, state, avail = next_obs, next_state, next_avail
                global_step += 1

                # Alg. 5 l.12, l.15, l.18: a training step's dual and Q minibatches, drawn at once, with V' (none in between)
                train = global_step > args.learning_starts and global_step % (n_updates * args.train_frequency) == 0
                batches = rb.sample(args.batch_size, rng, next_values, n=2 * n_updates) if train else []
                for dual_b in batches[:n_updates]:  # Alg. 5 l.12-14; --update-schedule released: 4 dual steps, then 4 Q steps
                    raw_eta, eta = dual_eta(dual_b)  # eta_xi(s, a), clamped to Eq. (10) (--no-eta-clamp: raw)
                    live = 1.0 - dual_b.terminated  # a terminated transition has no dual term
                    d_loss = dual_loss(eta, dual_b.next_value, args.rho, args.worst_value, args.dual_loss, live, raw_eta)
                    dual_optimizer.zero_grad()
                    d_loss.backward()  # Alg. 5 l.13
                    nn.utils.clip_grad_norm_(dual_network.parameters(), dual_max_norm, foreach=True, error_if_nonfinite=True)
                    dual_optimizer.step()  # Alg. 5 l.14
                for b in batches[n_updates:]:  # Alg. 5 l.15-21
                    q_taken = q_network(*b.history).gather(-1, b.actions.unsqueeze(-1)).squeeze(-1)  # Q_i(h_i, a_i)
                    q_tot = q_taken.sum(-1)  # Alg. 5 l.17: Q_tot^VDN(h, a; theta)
                    with torch.no_grad():  # Alg. 5 l.19: eta_xi(s, a) of the updated xi (clamped) and the target y
                        eta = dual_eta(b)[1]
                        y = robust_target(b.reward, b.next_value, eta, b.terminated, args.gamma, args.rho, args.worst_value)
                    td_loss = F.mse_loss(q_tot, y)  # Alg. 5 l.20
                    optimizer.zero_grad()
                    td_loss.backward()  # Alg. 5 l.21
                    grad_norm = nn.utils.clip_grad_norm_(params, max_norm, foreach=True, error_if_nonfinite=True)
                    optimizer.step()
                if train and global_step % (100 * args.train_frequency) == 0:  # logging, every 100 gradient steps
                    run.log(global_step, epsilon, td_loss, q_tot, y, grad_norm)  # losses/*, charts/*
                    floor = eta_bounds(b.next_value, args.gamma, args.rho, args.worst_value)[0]  # Eq. (10)'s floor
                    run.log_dual(global_step, eta, floor, d_loss)  # robust/*

                if global_step % args.target_network_frequency == 0:  # Alg. 5 l.22: theta- <- theta
                    target_network.load_state_dict(q_network.state_dict())
                    rb.target_changed()  # cached V' are stale
                if terminated or truncated:
                    break

            if starcraft and args.eval_every and global_step // args.eval_every > episode_start // args.eval_every:
                evaluation.starcraft_eval_round(sys.modules[__name__], q_network, env, global_step, run, device)
            if run.episode_end(episode + 1, global_step, episode_return, epsilon, info):  # progress, checkpoint, Ctrl-C
                break  # --total-steps reached

    if args.save_model:  # weights, args and env config, written atomically (eval.py reads them back)
        runs.save_model(run_dir, __file__, args, env, q_network=q_network, dual=dual_network)
