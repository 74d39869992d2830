"""GroupDR QMIX: the group distributionally robust baseline of Liu et al. (2025) with QMIX (paper Sec. 5.1, F.2), one file.

    python algos/groupdr_qmix.py --estimator-checkpoint runs/groupdr_estimator/estimator.pt

Stage 2 (stage 1: algos/groupdr_estimator.py): each episode in a config drawn uniformly from env_1..env_5; the monotone
mixer Q_tot(h, a) = f_theta(Q_1(h_1, a_1), .., Q_N(h_N, a_N), s) (Eq. 11) trained towards y = r_tilde + gamma *
f_theta-((Q_i(h'_i, a_bar'_i; theta-))_i, s'), r_tilde = min_k r_hat_k(s, a, t) the worst group's estimated reward.
Docs: docs/groupdr.md (usage, metrics, implementation details, deviations from the released code).
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

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import groupdr_reward as gdr  # GroupDR's groups and the frozen estimator r_hat_k (stage 1: groupdr_estimator.py)

import envs  # the tasks (building, StarCraft, matrix games) and the agents' acting window (History)
import fused  # per-agent layers and C++ kernels (the agents' LSTMs in one call, RMSprop in one pass)
import runs  # run plumbing: flags, run folder, checkpoint / resume, Ctrl-C, NaN guard, progress, logging


@dataclass
class Args(runs.RunArgs):  # + the run flags (--seed, --resume, ...)
    # Algorithm (paper F.2 defaults; GroupDR's groups are building configs)
    estimator_checkpoint: str = ""
    """estimator.pt written by algos/groupdr_estimator.py (stage 1); required"""
    env: Literal["building"] = "building"
    """the task: building only (GroupDR's groups are the building configs)"""
    train_configs: str = "env_1,env_2,env_3,env_4,env_5"
    """comma-separated building configs an episode is drawn from, uniformly (paper F.2: env_1..env_5)"""
    train_days: str = "0:200"
    """building: day-of-year range [a, b) a training episode is drawn from (paper: days 0-199)"""
    episode_steps: int = 0
    """cap on steps per episode, a time limit (0 = the env's own limit, 288 for building)"""
    total_episodes: int = 600
    """number of training episodes E (Alg. 3 l.5)"""
    gamma: float = 0.997
    """discount factor (F.1: 1/(1-gamma) = 288)"""
    learning_rate: float = 5e-4
    """learning rate of the one optimiser over the agent networks and the mixer"""
    buffer_size: int = 10_000
    """replay capacity in transitions"""
    batch_size: int = 64
    """transitions per gradient step"""
    train_frequency: int = 2
    """one gradient step every this many env steps"""
    learning_starts: int = 64
    """env steps before the first gradient step (paper silent: once a batch is stored)"""
    target_network_frequency: int = 25_000
    """env steps between hard copies theta- <- theta (Alg. 3 l.18)"""
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
    mixing_embed_dim: int = 32
    """width of the mixer's hidden layer and of its state-value head V(s) (paper F.2, released code)"""
    max_grad_norm: float = 10.0
    """gradient-norm clip, 0 = none (paper silent; released code: 10)"""
    rmsprop_eps: float = 1e-5
    """RMSprop epsilon (paper silent; released code: 1e-5, torch's default is 1e-8)"""

    # Released-code switches (docs/index.md, "Two configurations"; the paper's choice is the default)
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    """rmsprop (paper F.2) or adam (the released QMIX code), one optimiser over agents and mixer"""
    single_coin: bool = False
    """one epsilon coin for all agents (released code) instead of one per agent (Alg. 3 l.8)"""

    # Beyond the paper
    allow_env6: bool = False
    """allow env_6 in --train-configs (held out by the paper: no method trains on it)"""
    share_params: bool = False
    """one DRQN for all agents with an agent-id input (pymarl style) instead of one per agent"""


def check_args(args: Args) -> None:
    """One clear line naming the flag for every bad input, then exit != 0 (tyro checks the Literal choices)."""
    gdr.check_stage2_args(args)  # --estimator-checkpoint, --train-configs, --train-days, sizes (runs.check_counts)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


# --- GroupDR TD target ---
def groupdr_target(worst_reward, next_value, terminated, gamma):
    """y = r_tilde + gamma * Q_tot(h', a_bar'; theta-): the nominal QMIX target (Alg. 3, Eq. 15 at rho = 0) with the
    observed reward replaced by r_tilde = min_k r_hat_k(s, a, t) (paper F.2). Terminated (no next state): y = r_tilde."""
    return worst_reward + gamma * (1.0 - terminated) * next_value


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


class QMixer(nn.Module):
    """f_theta of Eq. (11) (paper F.2 "Mixing networks", as released): hypernetworks on the state s give
    w1 = |Linear(s)| (N x E), b1 = Linear(s), w2 = |Linear(s)| (E) and V(s) = Linear-ReLU-Linear;
    Q_tot = ELU(q @ w1 + b1) @ w2 + V(s). |.| makes every weight on q non-negative: dQ_tot/dQ_i >= 0."""

    def __init__(self, n_agents: int, state_dim: int, embed_dim: int = 32):
        super().__init__()
        self.n_agents, self.embed_dim = n_agents, embed_dim
        self.hyper_w1 = nn.Linear(state_dim, n_agents * embed_dim)
        self.hyper_b1 = nn.Linear(state_dim, embed_dim)
        self.hyper_w2 = nn.Linear(state_dim, embed_dim)
        self.hyper_v = nn.Sequential(nn.Linear(state_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))
        for layer in self.modules():  # as released (paper silent): every Linear xavier_uniform(gain 0.1), zero bias;
            if isinstance(layer, nn.Linear):  # torch's default init on the raw state gives Q_tot ~1e3-1e5 at start
                nn.init.xavier_uniform_(layer.weight, gain=0.1)
                nn.init.zeros_(layer.bias)

    def forward(self, q, state):
        """q (B, N) per-agent Q-values, state (B, state_dim) -> Q_tot (B,)."""
        w1 = self.hyper_w1(state).abs().view(-1, self.n_agents, self.embed_dim)
        hidden = F.elu(torch.bmm(q.unsqueeze(1), w1) + self.hyper_b1(state).unsqueeze(1))  # (B, 1, E)
        w2 = self.hyper_w2(state).abs().unsqueeze(-1)  # (B, E, 1)
        return (torch.bmm(hidden, w2).squeeze(-1) + self.hyper_v(state)).squeeze(-1)


def masked_argmax(q, avail):
    """argmax over available actions only (unavailable actions never chosen)."""
    return q.masked_fill(~avail, -float("inf")).argmax(-1)


# --- Replay ---
class Batch:
    """Slots idx of a buffer as device tensors; history / next_history: the (obs, prev. action) windows ending at t / t + 1."""

    def __init__(self, rb, idx):
        self.rb, self.idx = rb, idx
        for name in ("state", "actions", "reward", "terminated", "next_state", "next_avail", "next_value", "t"):
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
def target_values(b, target_network, target_mixer):
    """V' = Q_tot(h', a_bar'; theta-) = f_theta-((max_{a available} Q_i(h'_i, a; theta-))_i, s') (Alg. 3 l.12, l.14)
    of Batch b. Terminal next state (terminated transition): V' = 0, its value; --worst-value batch-min's m sees it."""
    q_next = target_network.greedy_q(*b.next_history)
    q_bar = q_next.masked_fill(~b.next_avail, -float("inf")).max(-1).values  # Q_i(h'_i, a_bar'_i; theta-)
    value = target_mixer(q_bar, b.next_state)
    return torch.where(b.terminated > 0, 0.0, value)  # y bootstraps nothing there either


if __name__ == "__main__":
    args = runs.parse_args(Args, __file__, check_args)  # --resume runs/<name>: that run's flags; one line per bad flag
    run_name = args.run_name or f"building__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join("runs", run_name)

    # Seeding: python, numpy, torch and the environment (configs, days, exploration) from one --seed
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = runs.torch_setup(args)  # deterministic algorithms, --torch-threads, --device

    # Environment: one env per training config (GroupDR's groups, paper F.2: env_1..env_5), built once
    train_configs, train_envs, (day_lo, day_hi) = gdr.training_groups(args)  # --train-configs, --train-days
    env = train_envs[train_configs[0]]
    N, A = env.n_agents, env.n_actions
    episode_steps = min(args.episode_steps or env.episode_limit, env.episode_limit)
    estimator, heads = gdr.stage_estimator(args, N, A, env.state_dim, device, train_configs)  # r_hat_k, frozen
    run = runs.Run(run_dir, args, __file__)  # the run folder: args.json, TensorBoard (continued on --resume)

    # Alg. 3 l.3-4: Q_i and mixer f with parameters theta, target theta- = theta
    q_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    mixer = QMixer(N, env.state_dim, args.mixing_embed_dim).to(device)
    params = list(q_network.parameters()) + list(mixer.parameters())
    # One optimiser over agents and mixer: RMSprop in the paper (F.2), Adam in the released QMIX code
    if args.optimizer == "rmsprop":
        optimizer = fused.RMSprop(params, lr=args.learning_rate, eps=args.rmsprop_eps, use_kernel=args.fused)
    else:
        optimizer = torch.optim.Adam(params, lr=args.learning_rate, fused=True)
    target_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    target_network.load_state_dict(q_network.state_dict())
    target_mixer = QMixer(N, env.state_dim, args.mixing_embed_dim).to(device)
    target_mixer.load_state_dict(mixer.state_dict())
    max_norm = args.max_grad_norm or float("inf")  # inf: the norm is only measured (logged, NaN guard)

    # Alg. 3 l.2: replay buffer D
    rb = ReplayBuffer(args.buffer_size, N, env.obs_dim, env.state_dim, A, args.window, device)
    history = envs.History(1, args.window, N, env.obs_dim)  # acting: each agent's last W (obs, prev. action)

    run.track(q_network=q_network, target_network=target_network, optimizer=optimizer, rb=rb, rng=rng)  # --resume: restored
    run.track(mixer=mixer, target_mixer=target_mixer)  # at `with run`
    global_step = run.global_step
    with run:  # Ctrl-C / SIGTERM: checkpoint at the episode's end; a non-finite gradient: one error line
        for episode in range(run.episode, args.total_episodes):  # Alg. 3 l.5
            env = train_envs[train_configs[int(rng.integers(len(train_configs)))]]  # GroupDR: a group, uniformly
            obs, state, avail = env.reset(int(rng.integers(day_lo, day_hi)))  # Alg. 3 l.6, a day uniformly
            history.reset(obs[None])
            episode_return = 0.0
            for t in range(episode_steps):  # Alg. 3 l.7
                # Alg. 3 l.8: each agent picks its action epsilon-greedily (masked to available actions)
                epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step)
                q = q_network.greedy_q(*history.tensors(device))[0]  # no_grad inside
                greedy = masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
                random_actions = np.argmax(rng.random((N, A)) * avail, axis=1)  # uniform over available
                coins = rng.random(1).repeat(N) if args.single_coin else rng.random(N)
                actions = np.where(coins < epsilon, random_actions, greedy)

                # Alg. 3 l.9: step the joint action
                next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(actions)
                truncated = truncated or t == episode_steps - 1
                episode_return += reward
                # Alg. 3 l.10: store (h, a, r, h'); windows are rebuilt from single transitions
                rb.add(obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t)
                history.push(next_obs[None], actions[None])
                obs, state, avail = next_obs, next_state, next_avail
                global_step += 1

                if global_step > args.learning_starts and global_step % args.train_frequency == 0:
                    b = rb.sample(args.batch_size, rng, lambda stale: target_values(stale, target_network, target_mixer))
                    q_taken = q_network(*b.history).gather(-1, b.actions.unsqueeze(-1)).squeeze(-1)  # Q_i(h_i, a_i)
                    q_tot = mixer(q_taken, b.state)  # Alg. 3 l.13: f_theta(Q_i, s)
                    r_tilde = gdr.worst_case_reward(estimator, b.state, b.actions, b.t)  # GroupDR, per sample
                    y = groupdr_target(r_tilde, b.next_value, b.terminated, args.gamma)  # l.15, r -> min_k r_hat_k(s, a, t)
                    td_loss = F.mse_loss(q_tot, y)  # Alg. 3 l.16
                    optimizer.zero_grad()
                    td_loss.backward()  # Alg. 3 l.17
                    grad_norm = nn.utils.clip_grad_norm_(params, max_norm, foreach=True, error_if_nonfinite=True)
                    optimizer.step()

                    if global_step % (100 * args.train_frequency) == 0:  # logging, every 100 gradient steps
                        r_means = {"r_tilde_mean": r_tilde.mean(), "reward_mean": b.reward.mean()}  # worst-case, observed r
                        run.log(global_step, epsilon, td_loss, q_tot, y, grad_norm, **r_means)  # losses/*, charts/*

                if global_step % args.target_network_frequency == 0:  # Alg. 3 l.18: theta- <- theta
                    target_network.load_state_dict(q_network.state_dict())
                    target_mixer.load_state_dict(mixer.state_dict())
                    rb.target_changed()  # cached V' are stale
                if terminated or truncated:
                    break

            if run.episode_end(episode + 1, global_step, episode_return, epsilon, info):  # progress, checkpoint, Ctrl-C
                break

    if args.save_model:  # weights, args and env config, written atomically (eval.py reads them back)
        runs.save_model(
            run_dir, __file__, args, env, ",".join(train_configs), estimator_configs=heads, q_network=q_network, mixer=mixer
        )
