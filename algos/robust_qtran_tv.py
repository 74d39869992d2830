"""Robust QTRAN with a total-variation (TV) uncertainty set: paper Algorithm 7, one file.

    python algos/robust_qtran_tv.py --rho 0.2 --env building

A joint network Q_jt(h, a), tied to the agents' Q_i by L_opt, L_nopt and V_tot(h) (Eq. 12-13),
is trained towards the robust target of Eq. (16): y = r + gamma * (1 - rho) * eta - gamma * [eta - V']_+,
V' = Q_jt(h', a_bar'; theta-), a_bar'_i = argmax Q_i(h'_i; theta-), with eta = eta_xi(s, a) from a dual
network trained on Eq. (17) (Alg. 7 l.12-14). Docs: docs/qtran.md (usage, metrics, implementation details).
"""

import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402  (environment plumbing shared by all scripts)
import fused  # noqa: E402  (C++ kernels: the agents' LSTMs in one call, RMSprop in one pass; same equations)
import eval as evaluation  # noqa: E402  (StarCraft win-rate evaluation during training)


@dataclass
class Args(envs.EnvArgs):  # + the run and environment flags of envs.EnvArgs (--seed, --env, --resume, ...)
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""

    # Algorithm (paper F.2 defaults)
    total_episodes: int = 600
    """number of training episodes E (Alg. 7 l.6)"""
    rho: float = 0.2
    """TV radius in [0, 1] (Eq. 9; the paper's best QTRAN-TV: 0.2)"""
    worst_value: str = "zero"
    """min V in Eq. (29): zero (Assumption 1/2, exactly Alg. 7) or batch-min (general operator)"""
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
    """env steps between hard copies theta- <- theta (Alg. 7 l.22)"""
    start_e: float = 1.0
    """initial epsilon"""
    end_e: float = 0.01
    """final epsilon"""
    exploration_steps: int = 120_000
    """env steps over which epsilon decays linearly"""
    single_coin: bool = False
    """one epsilon coin for all agents (released code) instead of one per agent (Alg. 7 l.9)"""
    hidden_dim: int = 64
    """width of the agent MLP and LSTM"""
    window: int = 8
    """history window: the last this many (obs, previous action) pairs"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, 0 = none (paper silent; released QTRAN-TV: 1.0, on the Q and the dual update)"""
    rmsprop_eps: float = 1e-5
    """RMSprop epsilon (paper silent; released code: 1e-5, torch's default is 1e-8)"""
    share_params: bool = False
    """one DRQN for all agents with an agent-id input (pymarl style) instead of one per agent"""
    fused: bool = True
    """agents' LSTMs and RMSprop in fused.py's C++ kernels (same equations; --no-fused: plain torch)"""
    qtran_learning_rate: float = 1e-3
    """Adam learning rate of Q_jt and V_tot (paper F.2); the agents keep RMSprop --learning-rate"""
    optimizer: str = "rmsprop"
    """rmsprop (paper F.2: RMSprop agents + Adam Q_jt/V) or adam (released: one Adam at --qtran-learning-rate over all)"""
    lambda_opt: float = 1.0
    """weight of L_opt, Eq. (12) (Alg. 7 l.21: 1)"""
    lambda_nopt: float = 1.0
    """weight of L_nopt, Eq. (13) (Alg. 7 l.21: 1)"""
    dual_learning_rate: float = 1e-3
    """Adam learning rate of the dual network eta_xi (paper F.2)"""
    dual_max_grad_norm: float = 1.0
    """gradient-norm clip of the dual update, 0 = none (paper silent; released QTRAN-TV: 1.0, VDN/QMIX-TV: none)"""
    dual_hidden_dim: int = 64
    """width of the dual network's layers"""
    dual_loss: str = "linear"
    """linear (Eq. 17) or squared (released code: the mean of the square of Eq. 17's term)"""
    eta_clamp: bool = True
    """clamp eta to Eq. (10)'s [0, 2/(rho(1-gamma))] in the dual loss and the target (released code: never)"""


def check_args(args: Args) -> None:
    """One clear line naming the flag for every bad input, then exit != 0."""
    if not 0.0 <= args.rho <= 1.0:
        envs.fail(f"--rho must be in [0, 1] for the TV uncertainty set (got {args.rho}; 0 = nominal, the released grid's first value)")
    if args.dual_loss not in ("linear", "squared"):
        envs.fail(f"--dual-loss must be one of linear, squared (got '{args.dual_loss}')")
    if args.worst_value not in ("zero", "batch-min"):
        envs.fail(f"--worst-value must be one of zero, batch-min (got '{args.worst_value}')")
    if args.optimizer not in ("rmsprop", "adam"):
        envs.fail(f"--optimizer must be one of rmsprop, adam (got '{args.optimizer}')")
    envs.check_run_args(args)  # --env, --train-config, --train-days, sizes


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


# ---------------------------------------------------------------------------------------------
# Robust TD target and dual network (TV: Eq. 10, 16, 17, 29)
# ---------------------------------------------------------------------------------------------
def eta_bounds(next_value, gamma, rho, worst_value="zero"):
    """Eq. (10): eta in [0, 2/(rho(1-gamma))]; batch-min: [m, m + 2/(rho(1-gamma))], m = min V' of the batch.
    rho = 0 (the nominal model) leaves eta unbounded above."""
    lo = next_value.min() if worst_value == "batch-min" else next_value.new_zeros(())
    return lo, lo + (2.0 / (rho * (1.0 - gamma)) if rho > 0 else float("inf"))


def robust_target(reward, next_value, eta, terminated, gamma, rho, worst_value="zero"):
    """Alg. 7 l.17, Eq. (16): y = r + gamma * (1 - rho) * eta - gamma * [eta - Q_jt(h', a_bar'; theta-)]_+.

    worst_value="zero" is the paper's operator, derived under Assumption 1/2 (min V = 0).
    worst_value="batch-min" is Eq. (29) without that assumption, min V estimated by m, the smallest
    next-state value in the batch; with eta' = eta - m >= 0: y = r + gamma * (m + (1 - rho) * eta'
    - [eta' - (V' - m)]_+). A terminated transition has no next state: y = r."""
    m = next_value.min() if worst_value == "batch-min" else 0.0
    bootstrap = m + (1.0 - rho) * (eta - m) - F.relu(eta - next_value)
    return reward + gamma * (1.0 - terminated) * bootstrap


def dual_loss(eta, next_value, rho, worst_value="zero", kind="linear", weight=None, raw_eta=None):
    """Alg. 7 l.13, Eq. (17): mean([eta - V']_+ - (1 - rho) * eta), V' = Q_jt(h', a_bar'; theta-) (= max_a').
    batch-min: (1 - rho) * (eta - m). kind="squared": the released code's squared term. weight: 0 for terminated
    transitions. raw_eta: the unclamped eta; (raw_eta - eta)^2 pulls it back into Eq. (10)'s range (ours)."""
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


# ---------------------------------------------------------------------------------------------
# Agent network: one DRQN per agent, exactly as released (paper F.2 "Robust individual Q-networks")
# ---------------------------------------------------------------------------------------------
class DRQN(nn.Module):
    """K DRQNs, each Linear(obs + onehot(prev action) [+ onehot(agent id)], 64) -> ReLU -> LSTM(64, 64)
    -> last output -> ReLU -> Linear(64, n_actions), run over a history window from a zero LSTM state.
    Every parameter is stacked over the K networks, so all K run as batched matrix products and one
    fused.lstm_last call. fc1's weight is kept as its obs columns (K, H, obs) and its one-hot columns
    as the rows of a lookup table (K, n_actions [+ n_ids], H); eval.agent_state_dict(drqn, k)
    gives network k in the released format (agent_{k}_q_network.pt)."""

    def __init__(self, n_nets: int, obs_dim: int, n_actions: int, hidden_dim: int, n_ids: int = 0, use_kernel=True):
        super().__init__()
        self.obs_dim, self.n_actions, self.use_kernel = obs_dim, n_actions, use_kernel
        in_dim, H = obs_dim + n_actions + n_ids, hidden_dim

        def param(*shape, fan_in):  # torch.nn's Linear and LSTM init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            return nn.Parameter(torch.empty(n_nets, *shape).uniform_(-(fan_in**-0.5), fan_in**-0.5))

        self.fc1_obs, self.fc1_table = param(H, obs_dim, fan_in=in_dim), param(n_actions + n_ids, H, fan_in=in_dim)
        self.fc1_bias = param(H, fan_in=in_dim)
        self.lstm_weight_ih, self.lstm_weight_hh = param(4 * H, H, fan_in=H), param(4 * H, H, fan_in=H)
        self.lstm_bias_ih, self.lstm_bias_hh = param(4 * H, fan_in=H), param(4 * H, fan_in=H)
        self.fc_out_weight, self.fc_out_bias = param(n_actions, H, fan_in=H), param(n_actions, fan_in=H)
        self.register_buffer("rows", (n_actions + n_ids) * torch.arange(n_nets).unsqueeze(1), persistent=False)

    def forward(self, obs_w, prev_a_w, agent_ids=None):
        """obs_w (K, W, M, obs_dim), prev_a_w (K, W, M) long [, agent_ids (M,)] -> Q (K, M, n_actions)
        and the last LSTM outputs (K, M, hidden)."""
        K, W, M, O = obs_w.shape
        table = self.fc1_table.reshape(-1, self.fc1_table.shape[-1])  # network k's row r is row self.rows[k] + r
        # fc1 on [obs, onehot(a_prev) (, onehot(id))] = obs columns + the one-hot columns looked up: same numbers
        x = torch.baddbmm(self.fc1_bias.unsqueeze(1), obs_w.reshape(K, W * M, O), self.fc1_obs.transpose(1, 2))
        x = x + table.index_select(0, (prev_a_w.reshape(K, W * M) + self.rows).reshape(-1)).view(K, W * M, -1)
        if agent_ids is not None:
            x = x + table.index_select(0, self.n_actions + agent_ids.repeat(W)).view(K, W * M, -1)
        h = fused.lstm_last(F.relu(x).view(K, W, M, -1), self.lstm_weight_ih, self.lstm_weight_hh,
                            self.lstm_bias_ih, self.lstm_bias_hh, self.use_kernel)  # zero initial state
        return torch.baddbmm(self.fc_out_bias.unsqueeze(1), F.relu(h), self.fc_out_weight.transpose(1, 2)), h


class QNetworks(nn.Module):
    """The N agents' Q_i(h_i, .): per-agent DRQNs (default) or one shared DRQN (--share-params)."""

    def __init__(self, n_agents, obs_dim, n_actions, hidden_dim, share_params=False, use_kernel=True):
        super().__init__()
        self.n_agents, self.share_params = n_agents, share_params
        n_nets, n_ids = (1, n_agents) if share_params else (n_agents, 0)
        self.drqn = DRQN(n_nets, obs_dim, n_actions, hidden_dim, n_ids, use_kernel)
        self.register_buffer("ids", torch.arange(n_agents), persistent=False)

    def forward(self, obs_w, prev_a_w, with_features=False):
        """obs_w (W, B, N, obs_dim), prev_a_w (W, B, N) -> Q-values (B, N, n_actions) [and the last LSTM
        outputs (B, N, hidden): the encoder that QTRAN's Q_jt and V_tot share with the agents]."""
        W, B, N = prev_a_w.shape
        if self.share_params:  # one DRQN; the N agents are N*B rows told apart by the id one-hot
            q, f = self.drqn(obs_w.reshape(1, W, B * N, -1), prev_a_w.reshape(1, W, B * N), self.ids.repeat(B))
            q, f = q.view(B, N, -1), f.view(B, N, -1)
        else:
            q, f = self.drqn(obs_w.permute(2, 0, 1, 3), prev_a_w.permute(2, 0, 1))  # agent k sees its own windows
            q, f = q.transpose(0, 1), f.transpose(0, 1)
        return (q, f) if with_features else q

    @torch.no_grad()
    def greedy_q(self, obs_w, prev_a_w, with_features=False):
        """forward() without gradients: acting and target values."""
        return self(obs_w, prev_a_w, with_features)


class QTranNetworks(nn.Module):
    """QTRAN-base Q_jt(h, a) and V_tot(h) (Son et al. 2019; paper Sec. 4, F.2), both on f(h) = sum_i f_i(h_i),
    the agents' last LSTM outputs summed (encoder shared with the DRQNs: L_td, L_opt, L_nopt all train it):
      Q_jt(h, a) = Linear(H,1)(ReLU(Linear(2H,H)([ReLU(Linear(N*A,H)(onehot(a_1)..onehot(a_N))), f(h)])))
      V_tot(h)   = Linear(H,1)(ReLU(Linear(2H,H)([ReLU(Linear(S,H)(s)), ReLU(Linear(H,H)(f(h)))])))  (as released)"""

    def __init__(self, n_agents: int, n_actions: int, state_dim: int, hidden_dim: int):
        super().__init__()
        self.action_fc, self.q_fc = nn.Linear(n_agents * n_actions, hidden_dim), nn.Linear(2 * hidden_dim, hidden_dim)
        self.q_out, self.v_fc, self.v_out = nn.Linear(hidden_dim, 1), nn.Linear(2 * hidden_dim, hidden_dim), nn.Linear(hidden_dim, 1)
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
    """Eq. (12)-(13), batch means; q_sum = sum_i Q_i(h_i, a_i) at the greedy a_bar / taken a. Q_jt enters
    detached (Q-hat), so L_opt and L_nopt train the agents and V_tot only."""
    opt = q_sum_greedy - q_jt_greedy.detach() + v_tot  # Eq. (12)
    nopt = torch.clamp(q_sum_taken - q_jt_taken.detach() + v_tot, max=0.0)  # Eq. (13)
    return (opt**2).mean(), (nopt**2).mean()


def masked_argmax(q, avail):
    """argmax over available actions only (unavailable actions never chosen)."""
    return q.masked_fill(~avail, -float("inf")).argmax(-1)


# ---------------------------------------------------------------------------------------------
# Histories and replay
# ---------------------------------------------------------------------------------------------
class History:
    """The acting window of E parallel episodes: the last W (obs, previous action) pairs, padded
    at the front with zero observations and previous-action index 0 (also the t=0 previous action)."""

    def __init__(self, n_envs, window, n_agents, obs_dim):
        self.obs = np.zeros((window, n_envs, n_agents, obs_dim), dtype=np.float32)
        self.prev_a = np.zeros((window, n_envs, n_agents), dtype=np.int64)

    def reset(self, obs):
        self.obs[:] = 0.0
        self.prev_a[:] = 0
        self.obs[-1] = obs

    def push(self, obs, prev_actions):
        self.obs = np.roll(self.obs, -1, axis=0)
        self.prev_a = np.roll(self.prev_a, -1, axis=0)
        self.obs[-1], self.prev_a[-1] = obs, prev_actions

    def tensors(self, device):
        return torch.from_numpy(self.obs).to(device), torch.from_numpy(self.prev_a).to(device)


class ReplayBuffer:
    """Each transition (o, s, avail, a, r, o', s', avail', terminated, truncated) is stored once, with its
    step index t in the episode; the window ending at t and the one ending at t+1 are gathered at
    sample time. The last transition of every episode is stored with its truncation flag."""

    def __init__(self, capacity, n_agents, obs_dim, state_dim, n_actions, window):
        self.capacity, self.window, self.ptr, self.size = capacity, window, 0, 0
        self.obs = np.zeros((capacity, n_agents, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros_like(self.obs)
        self.state = np.zeros((capacity, state_dim), dtype=np.float32)
        self.next_state = np.zeros_like(self.state)
        self.actions = np.zeros((capacity, n_agents), dtype=np.int64)
        self.next_avail = np.zeros((capacity, n_agents, n_actions), dtype=bool)
        self.avail = np.zeros_like(self.next_avail)  # at h: masks L_opt's greedy a_bar
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.truncated = np.zeros(capacity, dtype=np.float32)
        self.t = np.zeros(capacity, dtype=np.int64)
        # Cache of Q_tot(h', a_bar'; theta-): theta- only changes at the hard copy, so a value
        # computed once per target period equals recomputing it at every update.
        self.next_value = np.zeros(capacity, dtype=np.float32)
        self.value_version = np.full(capacity, -1, dtype=np.int64)

    def add(self, obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t, avail):
        i = self.ptr
        self.avail[i] = avail
        self.obs[i], self.state[i], self.actions[i], self.reward[i] = obs, state, actions, reward
        self.next_obs[i], self.next_state[i], self.next_avail[i] = next_obs, next_state, next_avail
        self.terminated[i], self.truncated[i], self.t[i], self.value_version[i] = terminated, truncated, t, -1
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, rng):
        """Uniform over stored transitions whose window is intact: once the buffer wraps, the
        W oldest slots may have lost the start of their window (W-1 earlier observations plus the
        previous action before the first of them) and are skipped."""
        if self.size < self.capacity:
            return rng.integers(0, self.size, batch_size)
        return (self.ptr + rng.integers(self.window, self.capacity, batch_size)) % self.capacity

    def stale(self, idx, version, newest=32):
        """Slots among idx without a cached target value for theta- version `version`; if there are
        any, the stale ones among the `newest` latest slots join them: one larger target pass instead
        of many tiny ones (each value is still computed once per target period)."""
        todo = idx[self.value_version[idx] != version]
        if len(todo):
            recent = (self.ptr - 1 - np.arange(min(newest, self.size))) % self.capacity
            todo = np.union1d(todo, recent[self.value_version[recent] != version])
        return todo

    def windows(self, idx):
        """Current windows (ending at t) and next windows (ending at t+1) of slots idx:
        obs (W, B, N, obs_dim) and previous actions (W, B, N), both pairs."""
        d = np.arange(1 - self.window, 1)  # offsets -(W-1) .. 0
        src = (idx[None, :] + d[:, None]) % self.capacity  # (W, B)
        tau = self.t[idx][None, :] + d[:, None]  # time step of each window position
        obs_w = np.where((tau >= 0)[..., None, None], self.obs[src], 0.0).astype(np.float32)
        prev_w = np.where((tau >= 1)[..., None], self.actions[(src - 1) % self.capacity], 0)
        next_obs_w = np.concatenate([obs_w[1:], self.next_obs[idx][None]], 0)
        next_prev_w = np.concatenate([prev_w[1:], self.actions[idx][None]], 0)
        return obs_w, prev_w, next_obs_w, next_prev_w


@torch.no_grad()
def target_values(rb, idx, target_network, target_qtran, device="cpu"):
    """Q_jt(h', a_bar'; theta-), a_bar'_i = argmax_{a available} Q_i(h'_i, a; theta-) (Alg. 7 l.16-17).
    Exact to cache (target agents and Q_jt change only at the hard copy). Terminal next state: V' = 0."""
    _, _, next_obs_w, next_prev_w = rb.windows(idx)
    q_next, f_next = target_network.greedy_q(torch.from_numpy(next_obs_w).to(device),
                                             torch.from_numpy(next_prev_w).to(device), with_features=True)
    a_bar = masked_argmax(q_next, torch.from_numpy(rb.next_avail[idx]).to(device))  # Alg. 7 l.16
    value = target_qtran.q_jt(f_next.sum(1), a_bar).cpu().numpy()
    return np.where(rb.terminated[idx] > 0, 0.0, value).astype(np.float32)  # y bootstraps nothing there either


if __name__ == "__main__":
    args = tyro.cli(Args)
    resume = evaluation.resume_args(args, __file__)  # --resume runs/<name>: that run's args and checkpoint
    check_args(args)
    starcraft = envs.apply_env_defaults(args, Args)  # StarCraft: SMAC-literature values (envs.py)
    run_name = args.run_name or f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join("runs", run_name)
    writer = evaluation.open_run(run_dir, args, resume)  # the run folder: args.json, TensorBoard (continued on --resume)

    # Seeding: python, numpy, torch and the environment (days, exploration) from one --seed
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-fill of every torch.empty (~1 ms a step)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    # Environment
    env = envs.make_env(args.env, args.train_config, seed=args.seed)
    N, A = env.n_agents, env.n_actions
    episode_steps = min(args.episode_steps or env.episode_limit, env.episode_limit)
    day_lo, day_hi = (int(x) for x in args.train_days.split(":"))

    # Alg. 7 l.3, l.5: Q_i, Q_jt and V_tot with parameters theta, target theta- = theta
    q_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    qtran = QTranNetworks(N, A, env.state_dim, args.hidden_dim).to(device)
    params = list(q_network.parameters()) + list(qtran.parameters())
    if args.optimizer == "rmsprop":  # paper F.2: agents RMSprop 5e-4, QTRAN networks Adam 1e-3; one backward of L (l.21)
        optimizers = [fused.RMSprop(q_network.parameters(), lr=args.learning_rate, eps=args.rmsprop_eps, use_kernel=args.fused),
                      torch.optim.Adam(qtran.parameters(), lr=args.qtran_learning_rate, fused=True)]
    else:  # released code: one Adam (lr --qtran-learning-rate) over agents, Q_jt and V
        optimizers = [torch.optim.Adam(params, lr=args.qtran_learning_rate, fused=True)]
    target_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    target_network.load_state_dict(q_network.state_dict())
    target_qtran = QTranNetworks(N, A, env.state_dim, args.hidden_dim).to(device)
    target_qtran.load_state_dict(qtran.state_dict())
    target_version = 0
    # Alg. 7 l.4: dual network eta_xi with parameters xi, its own Adam (paper F.2)
    dual_network = DualNetwork(env.state_dim, N, A, args.dual_hidden_dim).to(device)
    dual_optimizer = torch.optim.Adam(dual_network.parameters(), lr=args.dual_learning_rate, fused=True)

    # Alg. 7 l.2: replay buffer D
    rb = ReplayBuffer(args.buffer_size, N, env.obs_dim, env.state_dim, A, args.window)
    history = History(1, args.window, N, env.obs_dim)

    def dual_eta(idx, next_v):
        """eta_xi(s, a) of transitions idx: (raw, clamped to Eq. (10)'s range); --no-eta-clamp (released code): raw."""
        eta = dual_network(torch.from_numpy(rb.state[idx]).to(device), torch.from_numpy(rb.actions[idx]).to(device))
        return eta, (eta.clamp(*eta_bounds(next_v, args.gamma, args.rho, args.worst_value)) if args.eta_clamp else eta)

    # Checkpoints of all of the above, every RNG and the counters (--checkpoint-every, Ctrl-C), --resume, NaN guard
    run = evaluation.TrainingRun(run_dir, __file__, args, writer, resume, q_network=q_network,
                                 target_network=target_network, qtran=qtran, target_qtran=target_qtran,
                                 dual_network=dual_network, dual_optimizer=dual_optimizer, optimizers=optimizers, rb=rb,
                                 rng=rng)
    global_step, n_updates, recent = 0, 0, []
    at_floor, floor_noted = 0.0, False  # share of samples with eta at Eq. (10)'s floor (robust/eta_at_floor)
    next_eval = args.eval_every
    first_episode, global_step, n_updates, target_version, next_eval, recent, at_floor, floor_noted = run.counters(
        episode=0, global_step=global_step, n_updates=n_updates, target_version=target_version, next_eval=next_eval,
        recent=recent, at_floor=at_floor, floor_noted=floor_noted)  # --resume: the checkpoint's
    for episode in range(first_episode, args.total_episodes):  # Alg. 7 l.6
        day = episode if starcraft else int(rng.integers(day_lo, day_hi))  # StarCraft: episode id
        obs, state, avail = env.reset(day)  # Alg. 7 l.7
        history.reset(obs[None])
        episode_return = 0.0
        for t in range(episode_steps):  # Alg. 7 l.8
            # Alg. 7 l.9: each agent picks its action epsilon-greedily (masked to available actions)
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step)
            q = q_network.greedy_q(*history.tensors(device))[0]  # no_grad inside
            greedy = masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
            random_actions = np.argmax(rng.random((N, A)) * avail, axis=1)  # uniform over available
            coins = rng.random(1).repeat(N) if args.single_coin else rng.random(N)
            actions = np.where(coins < epsilon, random_actions, greedy)

            # Alg. 7 l.10: step the joint action
            next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(actions)
            truncated = truncated or t == episode_steps - 1
            episode_return += reward
            # Alg. 7 l.11: store (h, a, r, h'); windows are rebuilt from single transitions
            rb.add(obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t, avail)
            history.push(next_obs[None], actions[None])
            obs, state, avail = next_obs, next_state, next_avail
            global_step += 1

            if global_step > args.learning_starts and global_step % args.train_frequency == 0:
                update_start = time.perf_counter()
                # Alg. 7 l.12, l.15: the two minibatches, drawn at once (same law) so one call refreshes both caches
                idx = rb.sample(2 * args.batch_size, rng)
                todo = rb.stale(idx, target_version)  # no cached value for this theta- yet
                if len(todo):
                    rb.next_value[todo] = target_values(rb, todo, target_network, target_qtran, device)
                    rb.value_version[todo] = target_version
                dual_idx, idx = idx[: args.batch_size], idx[args.batch_size :]
                dual_v = torch.from_numpy(rb.next_value[dual_idx]).to(device)  # V' = Q_jt(h', a_bar'; theta-)
                live = 1.0 - torch.from_numpy(rb.terminated[dual_idx]).to(device)  # terminated: no dual term
                raw_eta, eta = dual_eta(dual_idx, dual_v)
                d_loss = dual_loss(eta, dual_v, args.rho, args.worst_value, args.dual_loss, live, raw_eta)
                dual_optimizer.zero_grad()
                d_loss.backward()  # Alg. 7 l.13
                if args.dual_max_grad_norm > 0:  # not in the paper (released QTRAN-TV: 1.0)
                    nn.utils.clip_grad_norm_(dual_network.parameters(), args.dual_max_grad_norm, foreach=True)
                run.check_finite(global_step, dual_loss=d_loss)  # NaN guard
                dual_optimizer.step()  # Alg. 7 l.14
                obs_w, prev_w, _, _ = rb.windows(idx)
                q, feats = q_network(torch.from_numpy(obs_w).to(device), torch.from_numpy(prev_w).to(device),
                                     with_features=True)
                actions_b = torch.from_numpy(rb.actions[idx]).to(device)
                q_taken = q.gather(-1, actions_b.unsqueeze(-1)).squeeze(-1)
                f_sum = feats.sum(1)  # sum over agents of their last LSTM outputs
                q_tot = qtran.q_jt(f_sum, actions_b)  # Q_jt(h, a; theta) of Alg. 7 l.18
                v_tot = qtran.v_tot(torch.from_numpy(rb.state[idx]).to(device), f_sum)
                avail_b = torch.from_numpy(rb.avail[idx]).to(device)
                q_greedy = q.masked_fill(~avail_b, -float("inf")).max(-1).values  # Q_i(h_i, a_bar_i), a_bar greedy
                with torch.no_grad():
                    q_jt_greedy = qtran.q_jt(f_sum, masked_argmax(q, avail_b))  # Q-hat_jt(h, a_bar) of Eq. (12)
                    next_v = torch.from_numpy(rb.next_value[idx]).to(device)  # l.16-17 (cached)
                    r_b = torch.from_numpy(rb.reward[idx]).to(device)
                    terminated_b = torch.from_numpy(rb.terminated[idx]).to(device)  # truncation bootstraps
                    eta = dual_eta(idx, next_v)[1]  # eta_xi(s, a) of this minibatch, clamped, no gradient
                    at_floor += (eta <= eta_bounds(next_v, args.gamma, args.rho, args.worst_value)[0]).float().mean().item()
                    y = robust_target(r_b, next_v, eta, terminated_b, args.gamma, args.rho, args.worst_value)  # l.17
                td_loss = F.mse_loss(q_tot, y)  # Alg. 7 l.18
                opt_loss, nopt_loss = qtran_losses(q_greedy.sum(-1), q_jt_greedy, q_taken.sum(-1), q_tot, v_tot)  # l.19-20
                for opt in optimizers:
                    opt.zero_grad()
                (td_loss + args.lambda_opt * opt_loss + args.lambda_nopt * nopt_loss).backward()  # Alg. 7 l.21
                max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")  # inf: only measure
                grad_norm = nn.utils.clip_grad_norm_(params, max_norm, foreach=True)  # one clip over agents + QTRAN networks
                run.check_finite(global_step, td_loss=td_loss, opt_loss=opt_loss, nopt_loss=nopt_loss, target=y, grad_norm=grad_norm)
                for opt in optimizers:
                    opt.step()
                n_updates += 1
                run.update_seconds += time.perf_counter() - update_start  # ms per update in the progress line
                if n_updates % 100 == 0:
                    writer.add_scalar("losses/td_loss", td_loss.item(), global_step)
                    writer.add_scalar("losses/opt_loss", opt_loss.item(), global_step)
                    writer.add_scalar("losses/nopt_loss", nopt_loss.item(), global_step)
                    writer.add_scalar("losses/q_taken_mean", q_tot.mean().item(), global_step)  # Q_tot(h, a; theta)
                    writer.add_scalar("losses/target_mean", y.mean().item(), global_step)
                    writer.add_scalar("losses/grad_norm", grad_norm.item(), global_step)
                    writer.add_scalar("charts/SPS", run.sps(global_step), global_step)
                    writer.add_scalar("charts/epsilon", epsilon, global_step)
                    for key, value in (("eta_mean", eta.mean()), ("eta_min", eta.min()), ("eta_max", eta.max()), ("dual_loss", d_loss)):
                        writer.add_scalar(f"robust/{key}", value.item(), global_step)
                    writer.add_scalar("robust/eta_at_floor", at_floor / 100, global_step)  # over the last 100 updates
                    floor_noted = floor_noted or evaluation.note_eta_floor(at_floor / 100, global_step, args)  # printed once
                    at_floor = 0.0

            if global_step % args.target_network_frequency == 0:  # Alg. 7 l.22: theta- <- theta
                target_network.load_state_dict(q_network.state_dict())
                target_qtran.load_state_dict(qtran.state_dict())
                target_version += 1
            if terminated or truncated:
                break

        writer.add_scalar("charts/episodic_return", episode_return, global_step)
        if args.env == "building":
            writer.add_scalar("charts/normalised_return", envs.normalised_return(episode_return), global_step)
        recent.append(episode_return)
        if starcraft and args.eval_every and global_step >= next_eval:  # Sec. 5.2, between episodes
            evaluation.starcraft_eval_round(sys.modules[__name__], q_network, env, args, global_step, writer, run_dir, device)
            next_eval += args.eval_every
        if starcraft:
            writer.add_scalar("charts/battle_won", float(info.get("battle_won", False)), global_step)
        done_training = episode + 1 == args.total_episodes or 0 < args.total_steps <= global_step
        recent = run.progress(episode + 1, global_step, n_updates, epsilon, recent, done_training)  # every --log-every
        run.episode_end(episode=episode + 1, global_step=global_step, n_updates=n_updates,
                        target_version=target_version, next_eval=next_eval, recent=recent, at_floor=at_floor,
                        floor_noted=floor_noted)  # checkpoint / Ctrl-C
        if done_training:
            break

    if args.save_model:  # weights, args and env config, written atomically (eval.py reads them back)
        env_info = {"env": args.env, "config": args.train_config, "n_agents": N, "n_actions": A,
                    "obs_dim": env.obs_dim, "state_dim": env.state_dim}
        path = evaluation.save_checkpoint(run_dir, __file__, args, env_info, q_network=q_network, dual=dual_network, joint=qtran)
        print(f"model saved to {path}")
    run.close()  # TensorBoard file, signal handlers
