"""GroupDR QTRAN: the group distributionally robust baseline of Liu et al. (2025) with QTRAN (paper Sec. 5.1, F.2), one file.

    python algos/groupdr_qtran.py --estimator-checkpoint runs/groupdr_estimator/estimator.pt

Stage 2 (stage 1: algos/groupdr_estimator.py), episodes from env_1..env_5: QTRAN-base (Q_jt, V_tot, L_opt, L_nopt) with
y = r_tilde + gamma * Q_jt(h', a_bar'; theta-), r_tilde = min_k r_hat_k(s, a, t). Docs: docs/groupdr.md.
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
    """number of training episodes E (Alg. 4 l.5)"""
    gamma: float = 0.997
    """discount factor (F.1: 1/(1-gamma) = 288)"""
    learning_rate: float = 5e-4
    """RMSprop learning rate of the agent networks"""
    qtran_learning_rate: float = 1e-3
    """Adam learning rate of Q_jt and V_tot (paper F.2); the agents keep RMSprop --learning-rate"""
    lambda_opt: float = 1.0
    """weight of L_opt, Eq. (12) (Alg. 4 l.17: 1)"""
    lambda_nopt: float = 1.0
    """weight of L_nopt, Eq. (13) (Alg. 4 l.17: 1)"""
    buffer_size: int = 10_000
    """replay capacity in transitions"""
    batch_size: int = 64
    """transitions per gradient step"""
    train_frequency: int = 2
    """one gradient step every this many env steps"""
    learning_starts: int = 64
    """env steps before the first gradient step (paper silent: once a batch is stored)"""
    target_network_frequency: int = 25_000
    """env steps between hard copies theta- <- theta (Alg. 4 l.18)"""
    start_e: float = 1.0
    """initial epsilon"""
    end_e: float = 0.01
    """final epsilon"""
    exploration_steps: int = 120_000
    """env steps over which epsilon decays linearly"""
    hidden_dim: int = 64
    """width of the agent MLP and LSTM (and of Q_jt, V_tot)"""
    window: int = 8
    """history window: the last this many (obs, previous action) pairs"""
    max_grad_norm: float = 10.0
    """gradient-norm clip, 0 = none (paper silent; released code: 10)"""
    rmsprop_eps: float = 1e-5
    """RMSprop epsilon (paper silent; released code: 1e-5, torch's default is 1e-8)"""

    # Released-code switches (docs/index.md, "Two configurations"; the paper's choice is the default)
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    """rmsprop (paper F.2: RMSprop agents + Adam Q_jt/V) or adam (released: one Adam at --qtran-learning-rate over all)"""
    single_coin: bool = False
    """one epsilon coin for all agents (released code) instead of one per agent (Alg. 4 l.8)"""

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
    """y = r_tilde + gamma * Q_jt(h', a_bar'; theta-): the nominal QTRAN target (Alg. 4, Eq. 15 at rho = 0) with the
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

    def forward(self, obs_w, prev_a_w, with_features=False):
        """obs_w (W, B, N, obs_dim), prev_a_w (W, B, N) -> Q (B, N, A) [, h_W (B, N, H): the features of Q_jt and V_tot]."""
        W, B, N = prev_a_w.shape
        if self.share_params:  # one DRQN; the N agents are N*B rows told apart by the id one-hot
            q, h = self.drqn(obs_w.reshape(1, W, B * N, -1), prev_a_w.reshape(1, W, B * N), self.ids.repeat(B))
            q, h = q.view(B, N, -1), h.view(B, N, -1)
        else:
            q, h = self.drqn(obs_w.permute(2, 0, 1, 3), prev_a_w.permute(2, 0, 1))  # agent k sees its own windows
            q, h = q.transpose(0, 1), h.transpose(0, 1)
        return (q, h) if with_features else q

    @torch.no_grad()
    def greedy_q(self, obs_w, prev_a_w, with_features=False):
        """forward() without gradients: acting and target values."""
        return self(obs_w, prev_a_w, with_features)


def masked_argmax(q, avail):
    """argmax over available actions only (unavailable actions never chosen)."""
    return q.masked_fill(~avail, -float("inf")).argmax(-1)


class QTranNetworks(nn.Module):
    """QTRAN-base Q_jt(h, a) and V_tot(h) (Son et al. 2019; paper Sec. 4, F.2), both on f(h) = sum_i f_i(h_i),
    the agents' last LSTM outputs summed (encoder shared with the DRQNs: L_td, L_opt, L_nopt all train it):
      Q_jt(h, a) = Linear(H,1)(ReLU(Linear(2H,H)([ReLU(Linear(N*A,H)(onehot(a_1)..onehot(a_N))), f(h)])))
      V_tot(h)   = Linear(H,1)(ReLU(Linear(2H,H)([ReLU(Linear(S,H)(s)), ReLU(Linear(H,H)(f(h)))])))  (as released)"""

    def __init__(self, n_agents: int, n_actions: int, state_dim: int, hidden_dim: int):
        super().__init__()
        self.action_fc, self.q_fc = nn.Linear(n_agents * n_actions, hidden_dim), nn.Linear(2 * hidden_dim, hidden_dim)
        self.q_out, self.v_fc = nn.Linear(hidden_dim, 1), nn.Linear(2 * hidden_dim, hidden_dim)
        self.v_out = nn.Linear(hidden_dim, 1)
        self.v_state, self.v_feat = nn.Linear(state_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)
        self.register_buffer("offsets", torch.arange(n_agents) * n_actions, persistent=False)

    def q_jt(self, f_sum, actions):
        """f_sum (B, H), actions (B, N) long -> Q_jt (B,); Linear(one-hot joint action) = sum of N weight columns."""
        a = F.embedding(actions + self.offsets, self.action_fc.weight.t()).sum(-2) + self.action_fc.bias
        return self.q_out(F.relu(self.q_fc(torch.cat([F.relu(a), f_sum], -1)))).squeeze(-1)

    def v_tot(self, state, f_sum):
        v = torch.cat([F.relu(self.v_state(state)), F.relu(self.v_feat(f_sum))], -1)  # paper silent: released V net shape
        return self.v_out(F.relu(self.v_fc(v))).squeeze(-1)


def qtran_losses(q_sum_greedy, q_jt_greedy, q_sum_taken, q_jt_taken, v_tot):
    """Eq. (12)-(13), batch means; q_sum = sum_i Q_i at the greedy a_bar / taken a; Q-hat_jt = Q_jt detached."""
    opt = q_sum_greedy - q_jt_greedy.detach() + v_tot  # Eq. (12)
    nopt = torch.clamp(q_sum_taken - q_jt_taken.detach() + v_tot, max=0.0)  # Eq. (13)
    return (opt**2).mean(), (nopt**2).mean()


# --- Replay ---
class Batch:
    """Slots idx of a buffer as device tensors; history / next_history: the (obs, prev. action) windows ending at t / t + 1."""

    def __init__(self, rb, idx):
        self.rb, self.idx = rb, idx
        for name in ("state", "avail", "actions", "reward", "terminated", "next_state", "next_avail", "next_value", "t"):
            setattr(self, name, torch.from_numpy(getattr(rb, name)[idx]).to(rb.device))

    @functools.cached_property
    def windows(self):
        return [torch.from_numpy(w).to(self.rb.device) for w in self.rb.windows(self.idx)]

    history = property(lambda self: self.windows[:2])  # (obs, previous action) windows ending at t
    next_history = property(lambda self: self.windows[2:])  # ... ending at t + 1


class ReplayBuffer:
    """D: each transition (o, s, avail, a, r, o', s', avail', terminated, truncated) stored once with its step t in the
    episode (windows are gathered at sample time), and V' per slot, cached: theta- only changes at the hard copy."""

    def __init__(self, capacity, n_agents, obs_dim, state_dim, n_actions, window, device="cpu"):
        self.capacity, self.window, self.ptr, self.size, self.device = capacity, window, 0, 0, device
        self.obs, self.next_obs = np.zeros((2, capacity, n_agents, obs_dim), dtype=np.float32)
        self.state, self.next_state = np.zeros((2, capacity, state_dim), dtype=np.float32)
        self.actions, self.t = np.zeros((capacity, n_agents), dtype=np.int64), np.zeros(capacity, dtype=np.int64)
        self.avail, self.next_avail = np.zeros((2, capacity, n_agents, n_actions), dtype=bool)  # avail at h: L_opt's a_bar
        self.reward, self.terminated, self.truncated = np.zeros((3, capacity), dtype=np.float32)
        self.next_value = np.zeros(capacity, dtype=np.float32)  # V' of theta- version value_version[slot]
        self.value_version = np.full(capacity, -1, dtype=np.int64)
        self.version = 0  # hard copies theta- <- theta so far

    def add(self, obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t, avail):
        i = self.ptr
        self.avail[i] = avail
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
def target_values(b, target_network, target_qtran):
    """V' = Q_jt(h', a_bar'; theta-), a_bar'_i = argmax_{a available} Q_i(h'_i, a; theta-) (Alg. 4 l.12-13) of Batch b.
    Terminal next state (terminated transition): V' = 0, its value; --worst-value batch-min's m sees it."""
    q_next, f_next = target_network.greedy_q(*b.next_history, with_features=True)
    a_bar = masked_argmax(q_next, b.next_avail)  # Alg. 4 l.12
    value = target_qtran.q_jt(f_next.sum(1), a_bar)
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

    # Alg. 4 l.3-4: Q_i, Q_jt and V_tot with parameters theta, target theta- = theta
    q_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    qtran = QTranNetworks(N, A, env.state_dim, args.hidden_dim).to(device)
    params = list(q_network.parameters()) + list(qtran.parameters())
    if args.optimizer == "rmsprop":  # paper F.2: agents RMSprop, Q_jt and V_tot Adam; one backward of L (l.17)
        agents = fused.RMSprop(q_network.parameters(), lr=args.learning_rate, eps=args.rmsprop_eps, use_kernel=args.fused)
        optimizers = [agents, torch.optim.Adam(qtran.parameters(), lr=args.qtran_learning_rate, fused=True)]
    else:  # released code: one Adam (lr --qtran-learning-rate) over agents, Q_jt and V_tot
        optimizers = [torch.optim.Adam(params, lr=args.qtran_learning_rate, fused=True)]
    target_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    target_network.load_state_dict(q_network.state_dict())
    target_qtran = QTranNetworks(N, A, env.state_dim, args.hidden_dim).to(device)
    target_qtran.load_state_dict(qtran.state_dict())
    max_norm = args.max_grad_norm or float("inf")  # inf: the norm is only measured (logged, NaN guard)
    next_values = functools.partial(target_values, target_network=target_network, target_qtran=target_qtran)  # V'

    # Alg. 4 l.2: replay buffer D
    rb = ReplayBuffer(args.buffer_size, N, env.obs_dim, env.state_dim, A, args.window, device)
    history = envs.History(1, args.window, N, env.obs_dim)  # acting: each agent's last W (obs, prev. action)

    run.track(q_network=q_network, target_network=target_network, optimizers=optimizers, rb=rb, rng=rng)  # --resume: restored
    run.track(qtran=qtran, target_qtran=target_qtran)  # at `with run`
    global_step = run.global_step
    with run:  # Ctrl-C / SIGTERM: checkpoint at the episode's end; a non-finite gradient: one error line
        for episode in range(run.episode, args.total_episodes):  # Alg. 4 l.5
            env = train_envs[train_configs[int(rng.integers(len(train_configs)))]]  # GroupDR: a group, uniformly
            obs, state, avail = env.reset(int(rng.integers(day_lo, day_hi)))  # Alg. 4 l.6, a day uniformly
            history.reset(obs[None])
            episode_return = 0.0
            for t in range(episode_steps):  # Alg. 4 l.7
                # Alg. 4 l.8: each agent picks its action epsilon-greedily (masked to available actions)
                epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step)
                q = q_network.greedy_q(*history.tensors(device))[0]  # no_grad inside
                greedy = masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
                random_actions = np.argmax(rng.random((N, A)) * avail, axis=1)  # uniform over available
                coins = rng.random(1).repeat(N) if args.single_coin else rng.random(N)
                actions = np.where(coins < epsilon, random_actions, greedy)

                # Alg. 4 l.9: step the joint action
                next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(actions)
                truncated = truncated or t == episode_steps - 1
                episode_return += reward
                # Alg. 4 l.10: store (h, a, r, h'); windows are rebuilt from single transitions
                rb.add(obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t, avail)
                history.push(next_obs[None], actions[None])
                obs, state, avail = next_obs, next_state, next_avail
                global_step += 1

                if global_step > args.learning_starts and global_step % args.train_frequency == 0:
                    b = rb.sample(args.batch_size, rng, next_values)  # Alg. 4 l.11-12: a minibatch, its V' (cached)
                    q, h = q_network(*b.history, with_features=True)  # Q_i(h_i, .) and the agents' features f_i(h_i)
                    q_taken = q.gather(-1, b.actions.unsqueeze(-1)).squeeze(-1)  # Q_i(h_i, a_i)
                    f_sum = h.sum(1)  # f(h) = sum_i f_i(h_i), the encoder of Q_jt and V_tot
                    q_tot = qtran.q_jt(f_sum, b.actions)  # Q_jt(h, a; theta) of Alg. 4 l.14
                    v_tot = qtran.v_tot(b.state, f_sum)  # V_tot(h) of Eq. (12)-(13)
                    q_greedy = q.masked_fill(~b.avail, -float("inf")).max(-1).values  # Q_i(h_i, a_bar_i), a_bar greedy
                    q_jt_greedy = qtran.q_jt(f_sum, masked_argmax(q, b.avail))  # Q-hat_jt(h, a_bar) of Eq. (12)
                    r_tilde = gdr.worst_case_reward(estimator, b.state, b.actions, b.t)  # GroupDR, per sample
                    y = groupdr_target(r_tilde, b.next_value, b.terminated, args.gamma)  # l.13, r -> min_k r_hat_k(s, a, t)
                    td_loss = F.mse_loss(q_tot, y)  # Alg. 4 l.14
                    opt_loss, nopt_loss = qtran_losses(q_greedy.sum(-1), q_jt_greedy, q_taken.sum(-1), q_tot, v_tot)  # l.15-16
                    for opt in optimizers:
                        opt.zero_grad()
                    (td_loss + args.lambda_opt * opt_loss + args.lambda_nopt * nopt_loss).backward()  # Alg. 4 l.17
                    grad_norm = nn.utils.clip_grad_norm_(params, max_norm, foreach=True, error_if_nonfinite=True)
                    for opt in optimizers:
                        opt.step()

                    if global_step % (100 * args.train_frequency) == 0:  # logging, every 100 gradient steps
                        more = {"opt_loss": opt_loss, "nopt_loss": nopt_loss, "r_tilde_mean": r_tilde.mean()}  # worst-case r
                        more["reward_mean"] = b.reward.mean()  # the observed r
                        run.log(global_step, epsilon, td_loss, q_tot, y, grad_norm, **more)  # losses/*, charts/*

                if global_step % args.target_network_frequency == 0:  # Alg. 4 l.18: theta- <- theta
                    target_network.load_state_dict(q_network.state_dict())
                    target_qtran.load_state_dict(qtran.state_dict())
                    rb.target_changed()  # cached V' are stale
                if terminated or truncated:
                    break

            if run.episode_end(episode + 1, global_step, episode_return, epsilon, info):  # progress, checkpoint, Ctrl-C
                break

    if args.save_model:  # weights, args and env config, written atomically (eval.py reads them back)
        runs.save_model(
            run_dir, __file__, args, env, ",".join(train_configs), estimator_configs=heads, q_network=q_network, joint=qtran
        )
