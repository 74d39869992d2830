"""GroupDR VDN: the group distributionally robust baseline of Liu et al. (2025) (paper Sec. 5.1, F.2),
one file.

    python algos/groupdr_vdn.py --estimator-checkpoint runs/groupdr_estimator/estimator.pt
    python algos/groupdr_vdn.py --observed-reward --single-coin   # stage 0: the released behaviour policy

Stage 2 of GroupDR (stage 1, the worst-case reward estimator, is algos/groupdr_estimator.py).
Every episode is drawn from one of the training environments env_1..env_5, picked uniformly at
random (paper F.2: "randomly sampling episodes from Env_1 to Env_5"; env_6 is never trained on).
Q_tot(h, a) = sum_i Q_i(h_i, a_i) (VDN) is trained towards the nominal VDN target with the
observed reward replaced by the estimated worst-case reward of the groups:
    y = r_tilde + gamma * Q_tot(h', a_bar'; theta-),   r_tilde = min_k r_hat_k(s, a, t),
a_bar'_i = argmax Q_i(h'_i; theta-). There is no rho. With --observed-reward the target keeps the observed
reward and no estimator is used: plain VDN on episodes drawn from env_1..env_5 (domain randomisation),
the behaviour policy of GroupDR's stage 1 as released (its vdn_dr.py, with --single-coin). Docs: docs/groupdr.md.

Deviations from the authors' released code, on purpose: (1) its estimator was fitted on all six
configs, env_6 included; here neither stage touches env_6 (paper F.2), both refuse it unless
--allow-env6; (2) it normalised the time feature by 255 in one place and by 288 in another; here
it is t / 288 everywhere: the estimator checkpoint stores time_norm and RewardEstimator applies
it to the raw step index stored in the replay, so fit and use cannot disagree; (3) as in every
script here, the last transition of each day is stored (released: dropped) and torch is seeded
from --seed (released: 42).
"""

import importlib.util
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
import eval as evaluation  # noqa: E402  (checkpoint format)
import fused  # noqa: E402  (C++ kernels: the agents' LSTMs in one call, RMSprop in one pass; same equations)


@dataclass
class Args(envs.RunArgs):  # + the run flags of envs.RunArgs (--seed, --run-name, --resume, ...)
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""

    # Environment (building only: GroupDR needs several training environments, the groups)
    env: str = "building"
    """the task: building only (GroupDR's groups are the building configs)"""
    train_configs: str = "env_1,env_2,env_3,env_4,env_5"
    """comma-separated building configs an episode is drawn from, uniformly (paper F.2: env_1..env_5)"""
    allow_env6: bool = False
    """allow env_6 in --train-configs (held out by the paper: no method trains on it)"""
    train_days: str = "0:200"
    """building: day-of-year range [a, b) a training episode is drawn from (paper: days 0-199)"""
    episode_steps: int = 0
    """cap on steps per episode, a time limit (0 = the env's own limit, 288 for building)"""

    # Algorithm (paper F.2 defaults)
    estimator_checkpoint: str = ""
    """estimator.pt written by algos/groupdr_estimator.py (stage 1); required unless --observed-reward"""
    observed_reward: bool = False
    """no estimator: the target keeps the observed reward (plain VDN on --train-configs: GroupDR's behaviour policy)"""
    total_episodes: int = 600
    """number of training episodes E (Alg. 2 l.5)"""
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
    """env steps between hard copies theta- <- theta (Alg. 2 l.18)"""
    start_e: float = 1.0
    """initial epsilon"""
    end_e: float = 0.01
    """final epsilon"""
    exploration_steps: int = 120_000
    """env steps over which epsilon decays linearly"""
    single_coin: bool = False
    """one epsilon coin for all agents (released code) instead of one per agent (Alg. 2 l.8)"""
    hidden_dim: int = 64
    """width of the agent MLP and LSTM"""
    window: int = 8
    """history window: the last this many (obs, previous action) pairs"""
    max_grad_norm: float = 0.0
    """gradient-norm clip, 0 = none (paper silent; released VDN: none, QMIX/QTRAN 10, QTRAN-TV 1)"""
    rmsprop_eps: float = 1e-5
    """RMSprop epsilon (paper silent; released code: 1e-5, torch's default is 1e-8)"""
    share_params: bool = False
    """one DRQN for all agents with an agent-id input (pymarl style) instead of one per agent"""
    fused: bool = True
    """agents' LSTMs and RMSprop in fused.py's C++ kernels (same equations; --no-fused: plain torch)"""


def load_estimator_module():
    """algos/groupdr_estimator.py (stage 1) as a module: its RewardEstimator, load_estimator and
    parse_configs. Loaded from this file's folder, so it works however this script is imported."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "groupdr_estimator.py")
    spec = importlib.util.spec_from_file_location("groupdr_estimator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_args(args: Args) -> None:
    """One clear line naming the flag for every bad input, then exit != 0."""
    if args.env != "building":
        envs.fail(f"--env must be building (got '{args.env}'): GroupDR's groups are the building configs")
    if args.observed_reward and args.estimator_checkpoint:
        envs.fail("--estimator-checkpoint and --observed-reward exclude each other (--observed-reward trains on the "
                  "observed reward, without an estimator)")
    if not args.estimator_checkpoint and not args.observed_reward:
        envs.fail("--estimator-checkpoint is required: run stage 1 first, "
                  "python algos/groupdr_estimator.py --behaviour-checkpoint runs/groupdr_behaviour/model.pt "
                  "--run-name groupdr_estimator (see docs/groupdr.md)")
    if args.estimator_checkpoint and not os.path.isfile(args.estimator_checkpoint):
        envs.fail(f"--estimator-checkpoint: no such file '{args.estimator_checkpoint}'")
    est = load_estimator_module()
    try:
        est.parse_configs(args.train_configs, args.allow_env6, "--train-configs")
        est.parse_days(args.train_days)
    except envs.EnvArgError as e:
        envs.fail(str(e))
    envs.check_counts(args)  # every count and frequency flag (--log-every, --batch-size, ...)


def make_train_envs(configs):
    """One building env per training config, built once; every episode drawn from a config reuses it."""
    return {config: envs.make_env("building", config) for config in configs}


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


# ---------------------------------------------------------------------------------------------
# GroupDR TD target
# ---------------------------------------------------------------------------------------------
def groupdr_target(worst_reward, next_value, terminated, gamma):
    """y = r_tilde + gamma * Q_tot(h', a_bar'; theta-): the nominal VDN target (Alg. 2, Eq. 15 at rho = 0)
    with the observed reward replaced by r_tilde = min_k r_hat_k(s, a, t) (paper F.2, GroupDR).
    A terminated transition has no next state: y = r_tilde."""
    return worst_reward + gamma * (1.0 - terminated) * next_value


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
    """Each transition (o, s, a, r, o', s', avail', terminated, truncated) is stored once, with its
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
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.truncated = np.zeros(capacity, dtype=np.float32)
        self.t = np.zeros(capacity, dtype=np.int64)
        # Cache of Q_tot(h', a_bar'; theta-): theta- only changes at the hard copy, so a value
        # computed once per target period equals recomputing it at every update.
        self.next_value = np.zeros(capacity, dtype=np.float32)
        self.value_version = np.full(capacity, -1, dtype=np.int64)

    def add(self, obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t):
        i = self.ptr
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


if __name__ == "__main__":
    args = tyro.cli(Args)
    resume = evaluation.resume_args(args, __file__)  # --resume runs/<name>: that run's args and checkpoint
    check_args(args)
    run_name = args.run_name or f"building__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join("runs", run_name)

    # Seeding: python, numpy, torch and the environment (configs, days, exploration) from one --seed
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-fill of every torch.empty (~1 ms a step)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    # Environment: one env per training config (GroupDR's groups, paper F.2: env_1..env_5), built
    # once. env_6 is refused by parse_configs unless --allow-env6.
    est = load_estimator_module()
    train_configs = est.parse_configs(args.train_configs, args.allow_env6, "--train-configs")
    train_envs = make_train_envs(train_configs)
    env = train_envs[train_configs[0]]
    N, A = env.n_agents, env.n_actions
    episode_steps = min(args.episode_steps or env.episode_limit, env.episode_limit)
    day_lo, day_hi = est.parse_days(args.train_days)

    # GroupDR stage 1: the frozen reward estimator r_hat_k(s, a, t), one head per estimator config
    estimator, estimator_ckpt = None, {"configs": None}
    if args.observed_reward:  # stage 0: plain VDN with domain randomisation, the behaviour policy of stage 1
        print(f"observed reward, no estimator: plain VDN on episodes from {','.join(train_configs)}", flush=True)
    else:
        try:
            estimator, estimator_ckpt = est.load_estimator(args.estimator_checkpoint, N, A, env.state_dim, device)
        except est.EstimatorError as e:
            envs.fail(f"--estimator-checkpoint: {e}")
        if est.HELD_OUT_CONFIG in estimator_ckpt["configs"] and not args.allow_env6:  # env_6 data = training on env_6
            envs.fail(f"--estimator-checkpoint: its heads include {est.HELD_OUT_CONFIG}, the held-out test config "
                      "(fitted with --allow-env6); pass --allow-env6 to train with it anyway")
        print(f"estimator {args.estimator_checkpoint}: heads {','.join(estimator_ckpt['configs'])}, time t/"
              f"{estimator_ckpt['time_norm']:g}; training episodes from {','.join(train_configs)}", flush=True)
    writer = evaluation.open_run(run_dir, args, resume)  # the run folder: args.json, TensorBoard (continued on --resume)

    # Alg. 2 l.3-4: Q_i with parameters theta, target theta- = theta
    q_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    optimizer = fused.RMSprop(q_network.parameters(), lr=args.learning_rate, eps=args.rmsprop_eps, use_kernel=args.fused)  # = torch.optim.RMSprop
    target_network = QNetworks(N, env.obs_dim, A, args.hidden_dim, args.share_params, args.fused).to(device)
    target_network.load_state_dict(q_network.state_dict())
    target_version = 0

    # Alg. 2 l.2: replay buffer D
    rb = ReplayBuffer(args.buffer_size, N, env.obs_dim, env.state_dim, A, args.window)
    history = History(1, args.window, N, env.obs_dim)

    @torch.no_grad()
    def target_values(idx):
        """Q_tot(h', a_bar'; theta-) = sum_i max_{a available} Q_i(h'_i, a; theta-) (Alg. 2 l.12, l.14)."""
        _, _, next_obs_w, next_prev_w = rb.windows(idx)
        q_next = target_network.greedy_q(torch.from_numpy(next_obs_w).to(device), torch.from_numpy(next_prev_w).to(device))
        avail = torch.from_numpy(rb.next_avail[idx]).to(device)
        return q_next.masked_fill(~avail, -float("inf")).max(-1).values.sum(-1).cpu().numpy()

    # Checkpoints of all of the above, every RNG and the counters (--checkpoint-every, Ctrl-C), --resume, NaN guard
    run = evaluation.TrainingRun(run_dir, __file__, args, writer, resume, q_network=q_network,
                                 target_network=target_network, optimizer=optimizer, rb=rb, rng=rng)
    global_step, n_updates, recent = 0, 0, []
    first_episode, global_step, n_updates, target_version, recent = run.counters(
        episode=0, global_step=global_step, n_updates=n_updates, target_version=target_version, recent=recent)  # --resume: the checkpoint's
    for episode in range(first_episode, args.total_episodes):  # Alg. 2 l.5
        # GroupDR (paper F.2): each episode comes from a training environment picked uniformly
        env = train_envs[train_configs[int(rng.integers(len(train_configs)))]]
        day = int(rng.integers(day_lo, day_hi))
        obs, state, avail = env.reset(day)  # Alg. 2 l.6
        history.reset(obs[None])
        episode_return = 0.0
        for t in range(episode_steps):  # Alg. 2 l.7
            # Alg. 2 l.8: each agent picks its action epsilon-greedily (masked to available actions)
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step)
            with torch.no_grad():
                q = q_network.greedy_q(*history.tensors(device))[0]
            greedy = masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
            random_actions = np.argmax(rng.random((N, A)) * avail, axis=1)  # uniform over available
            coins = rng.random(1).repeat(N) if args.single_coin else rng.random(N)
            actions = np.where(coins < epsilon, random_actions, greedy)

            # Alg. 2 l.9: step the joint action
            next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(actions)
            truncated = truncated or t == episode_steps - 1
            episode_return += reward
            # Alg. 2 l.10: store (h, a, r, h'); windows are rebuilt from single transitions
            rb.add(obs, state, actions, reward, next_obs, next_state, next_avail, terminated, truncated, t)
            history.push(next_obs[None], actions[None])
            obs, state, avail = next_obs, next_state, next_avail
            global_step += 1

            if global_step > args.learning_starts and global_step % args.train_frequency == 0:
                update_start = time.perf_counter()
                idx = rb.sample(args.batch_size, rng)  # Alg. 2 l.11
                todo = rb.stale(idx, target_version)  # no cached value for this theta- yet
                if len(todo):
                    rb.next_value[todo] = target_values(todo)
                    rb.value_version[todo] = target_version
                obs_w, prev_w, _, _ = rb.windows(idx)
                q = q_network(torch.from_numpy(obs_w).to(device), torch.from_numpy(prev_w).to(device))
                actions_b = torch.from_numpy(rb.actions[idx]).to(device)
                q_taken = q.gather(-1, actions_b.unsqueeze(-1)).squeeze(-1)
                q_tot = q_taken.sum(-1)  # Alg. 2 l.13: Q_tot^VDN(h, a; theta)
                with torch.no_grad():
                    next_v = torch.from_numpy(rb.next_value[idx]).to(device)  # l.14 (cached)
                    r_b = torch.from_numpy(rb.reward[idx]).to(device)  # observed reward: logged only
                    terminated_b = torch.from_numpy(rb.terminated[idx]).to(device)  # truncation bootstraps
                    # GroupDR: r_tilde = min_k r_hat_k(s_t, a_t, t), per sample, from the stored s, a, t
                    state_b, t_b = torch.from_numpy(rb.state[idx]).to(device), torch.from_numpy(rb.t[idx]).to(device)
                    r_tilde = r_b if args.observed_reward else est.worst_case_reward(estimator, state_b, actions_b, t_b)
                    y = groupdr_target(r_tilde, next_v, terminated_b, args.gamma)  # l.15 with r -> r_tilde
                td_loss = F.mse_loss(q_tot, y)  # Alg. 2 l.16
                optimizer.zero_grad()
                td_loss.backward()  # Alg. 2 l.17
                if args.max_grad_norm > 0:
                    grad_norm = nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm, foreach=True)
                else:
                    grad_norm = torch.zeros(())
                run.check_finite(global_step, td_loss=td_loss, target=y, grad_norm=grad_norm)  # NaN guard: no step on them
                optimizer.step()
                n_updates += 1
                run.update_seconds += time.perf_counter() - update_start  # ms per update in the progress line
                if n_updates % 100 == 0:
                    writer.add_scalar("losses/td_loss", td_loss.item(), global_step)
                    writer.add_scalar("losses/q_taken_mean", q_tot.mean().item(), global_step)  # Q_tot(h, a; theta)
                    writer.add_scalar("losses/target_mean", y.mean().item(), global_step)
                    writer.add_scalar("losses/grad_norm", grad_norm.item(), global_step)
                    writer.add_scalar("losses/r_tilde_mean", r_tilde.mean().item(), global_step)
                    writer.add_scalar("losses/reward_mean", r_b.mean().item(), global_step)
                    writer.add_scalar("charts/SPS", run.sps(global_step), global_step)
                    writer.add_scalar("charts/epsilon", epsilon, global_step)

            if global_step % args.target_network_frequency == 0:  # Alg. 2 l.18: theta- <- theta
                target_network.load_state_dict(q_network.state_dict())
                target_version += 1
            if terminated or truncated:
                break

        writer.add_scalar("charts/episodic_return", episode_return, global_step)
        writer.add_scalar("charts/normalised_return", envs.normalised_return(episode_return), global_step)
        recent.append(episode_return)
        recent = run.progress(episode + 1, global_step, n_updates, epsilon, recent, episode + 1 == args.total_episodes)
        run.episode_end(episode=episode + 1, global_step=global_step, n_updates=n_updates,
                        target_version=target_version, recent=recent)  # checkpoint / Ctrl-C

    if args.save_model:  # weights, args and env config, written atomically (eval.py reads them back)
        env_info = {"env": "building", "config": ",".join(train_configs), "n_agents": N, "n_actions": A,
                    "obs_dim": env.obs_dim, "state_dim": env.state_dim}
        path = evaluation.save_checkpoint(run_dir, __file__, args, env_info, estimator_configs=estimator_ckpt["configs"], q_network=q_network)
        print(f"model saved to {path}")
    run.close()  # TensorBoard file, signal handlers
