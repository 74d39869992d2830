"""GroupDR stage 1: the contextual-bandit worst-case reward estimator (paper F.2, "GroupDR training").

    python algos/groupdr_vdn.py --observed-reward --single-coin --save-model --run-name groupdr_behaviour  # stage 0
    python algos/groupdr_estimator.py --behaviour-checkpoint runs/groupdr_behaviour/model.pt --run-name groupdr_estimator

GroupDR (Liu et al., 2025, group distributionally robust MARL) treats each training environment
env_k as a group. Stage 1 rolls out a VDN-trained behaviour policy on env_1..env_5 and fits one
reward model per group, r_hat_k(s, a, t) (a contextual bandit: context (s, t), arm = the joint
action a). Stage 2 (algos/groupdr_{vdn,qmix,qtran}.py) trains the agents with the worst group's
predicted reward r_tilde = min_k r_hat_k(s, a, t) in the TD target. env_6 is never used for
training (paper F.2), so this script refuses it unless --allow-env6 is given.

The default is the released pipeline (the paper gives no architecture and no fit):
  * --architecture released: separate embeddings of the raw state, the one-hot joint action and the
    time feature t / time_norm, each Linear(., 64) -> ReLU, concatenated (192) -> Linear(192, 64) ->
    ReLU -> Linear(64, K), one output column (head) per group, raw rewards;
  * --fit online: 1000 behaviour episodes, each in a group drawn uniformly and on a day drawn from
    --train-days, epsilon-greedy with one joint coin at 0.5; every transition (s, a, k, r, t) goes into
    a replay of 10,000, and every 2 stored transitions one Adam step (lr 5e-4, gradient-norm clip 10)
    on a minibatch of 64 drawn without replacement: head k of each transition regresses its reward (MSE).
The fit of the first version of this script stays available: --fit offline --architecture trunk
--per-agent-coins (40 episodes per group collected first, then 5000 Adam steps of a 128-wide shared trunk
on standardised inputs and rewards).
Stage 2 imports this file for its flags and groups (check_stage2_args, training_groups) and the frozen estimator
(stage_estimator, worst_case_reward). Docs: docs/groupdr.md (usage, metrics, implementation details).

Deviations from the authors' released code, on purpose: (1) its estimator had a head for, and data
from, all six configs, env_6 included; here the default is env_1..env_5 and env_6 needs --allow-env6
(paper F.2: "Env_6 is never used for training by any method"); (2) its time feature was t / 255
in the fit and in QMIX's stage 2, t / 288 in VDN's and QTRAN's; here t / --time-norm (288) in both: time_norm
is stored in the checkpoint and applied inside the network to the raw step index, so stage 2 cannot disagree;
(3) the last transition of every day is kept (the released code drops it); (4) torch, numpy and the
day / group draws are seeded from --seed (released: 42 everywhere).
"""

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
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # the tasks (building, StarCraft, matrix games) and the agents' acting window (History)
import eval as evaluation  # StarCraft win-rate evaluation during training
import runs  # run plumbing: flags, run folder, checkpoint / resume, Ctrl-C, NaN guard, progress, logging

ESTIMATOR_FORMAT = "drigm-groupdr-estimator-v1"
TRAIN_CONFIGS = "env_1,env_2,env_3,env_4,env_5"  # paper F.2: GroupDR's groups; env_6 is held out
HELD_OUT_CONFIG = "env_6"
BEHAVIOUR_COMMAND = "python algos/groupdr_vdn.py --observed-reward --single-coin --save-model --run-name groupdr_behaviour"
ESTIMATOR_COMMAND = (
    "python algos/groupdr_estimator.py --behaviour-checkpoint runs/groupdr_behaviour/model.pt --run-name groupdr_estimator"
)
ARCHITECTURES = {"released": 64, "trunk": 128}  # architecture -> its default width (--hidden-dim 0)


@dataclass
class Args:  # not runs.RunArgs: no checkpoint.pt / --resume (a fit takes minutes), --log-every 0 = its own defaults
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    run_name: str = ""
    """run folder under runs/ (default: building__{exp_name}__{seed}__{unix time})"""
    seed: int = 1
    """seed of python, numpy, torch, the groups and days of the episodes, exploration and minibatches"""
    device: str = "cpu"
    """torch device (cpu or cuda)"""
    torch_threads: int = 0
    """torch intra-op threads (0 = torch's default; 1 is fastest on a 2-core machine)"""
    log_every: int = 0
    """progress line every this many episodes (online) or fitting steps (offline); 0 = 50 episodes / 500 steps"""

    # Environment
    configs: str = TRAIN_CONFIGS
    """comma-separated building configs, one estimator head (group) each (paper F.2: env_1..env_5)"""
    allow_env6: bool = False
    """allow env_6 in --configs (the released code's estimator saw it; the paper never trains on it)"""
    train_days: str = "0:200"
    """building: day-of-year range [a, b) a training episode is drawn from (paper: days 0-199)"""
    episode_steps: int = 0
    """cap on steps per episode, a time limit (0 = the env's own limit, 288 for building)"""

    # Behaviour policy
    behaviour_checkpoint: str = ""
    """model.pt of the VDN behaviour policy (algos/groupdr_vdn.py --observed-reward --save-model); required"""
    behaviour_epsilon: float = 0.5
    """epsilon of the epsilon-greedy behaviour policy (released code: 0.5)"""
    per_agent_coins: bool = False
    """one epsilon coin per agent instead of one joint coin for all agents (released: joint)"""

    # Estimator network (paper silent; released: --architecture released, 64 wide)
    fit: Literal["online", "offline"] = "online"
    """online (released: fitted while the behaviour episodes are played) or offline (collect, then fit)"""
    architecture: Literal["released", "trunk"] = "released"
    """released (state / joint-action / time embeddings, raw inputs) or trunk (one MLP on standardised inputs)"""
    hidden_dim: int = 0
    """width of the estimator's hidden layers (0 = the architecture's: released 64, trunk 128)"""
    time_norm: float = 288.0
    """the time feature is t / time_norm, t the step index in the day (released: 255 in the fit, 288 in VDN/QTRAN stage 2)"""

    # --fit online (released values)
    episodes: int = 1000
    """behaviour episodes, each in a group drawn uniformly (released: 1000)"""
    buffer_size: int = 10_000
    """replay capacity in transitions (released: 10,000)"""
    batch_size: int = 64
    """transitions per fitting step, drawn without replacement (released: 64)"""
    train_frequency: int = 2
    """one fitting step every this many stored transitions (released: 2)"""
    learning_rate: float = 5e-4
    """Adam learning rate of the online fit (released: 5e-4)"""
    grad_clip: float = 10.0
    """gradient-norm clip of every online fitting step, 0 = none (released: 10)"""

    # --fit offline (the first version of this script; paper silent)
    episodes_per_config: int = 40
    """offline: episodes collected in every config"""
    parallel_envs: int = 10
    """offline: episodes of one config run in lockstep, one batched network pass per step"""
    fit_steps: int = 5000
    """offline: Adam steps of the estimator fit"""
    fit_batch_size: int = 256
    """offline: transitions per environment in every fitting minibatch"""
    fit_learning_rate: float = 1e-3
    """offline: Adam learning rate of the estimator"""
    val_fraction: float = 0.1
    """offline: fraction of each environment's transitions held out to report the fit"""


def parse_configs(text: str, allow_env6: bool, flag: str = "--configs") -> list[str]:
    """'env_1,env_2' -> ['env_1', 'env_2'], refusing unknown, repeated and (by default) held-out configs."""
    configs = [c.strip() for c in text.split(",") if c.strip()]
    if not configs:
        raise envs.EnvArgError(f"{flag} is empty; give e.g. {TRAIN_CONFIGS}")
    for c in configs:
        if c not in envs.BUILDING_CONFIGS:
            raise envs.EnvArgError(f"{flag} '{c}' is unknown; accepted: {', '.join(envs.BUILDING_CONFIGS)}")
    if len(set(configs)) != len(configs):
        raise envs.EnvArgError(f"{flag} names a config twice ('{text}')")
    if HELD_OUT_CONFIG in configs and not allow_env6:
        raise envs.EnvArgError(
            f"{flag} includes {HELD_OUT_CONFIG}, the held-out test config that no method trains on (paper F.2); "
            "pass --allow-env6 to use it anyway (the released code's estimator did)"
        )
    return configs


def parse_days(text: str, flag: str = "--train-days") -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    if not (lo.isdigit() and hi.isdigit() and int(lo) < int(hi)):
        raise envs.EnvArgError(f"{flag} must look like a:b with integers a < b (got '{text}')")
    return int(lo), int(hi)


def check_groups(configs: str, allow_env6: bool, days: str, flag: str = "--configs") -> None:
    """--configs / --train-configs and --train-days (parse_configs, parse_days): one error line, exit 2."""
    try:
        parse_configs(configs, allow_env6, flag)
        parse_days(days)
    except envs.EnvArgError as e:
        runs.fail(str(e))


def check_stage2_args(args) -> None:
    """The flags of algos/groupdr_{vdn,qmix,qtran}.py (their runs.check_run_args): --estimator-checkpoint given and a
    file (unless --observed-reward; its contents: stage_estimator), --train-configs, --train-days, every count and
    frequency (runs.check_counts). One error line naming the flag, exit 2."""
    if getattr(args, "observed_reward", False) and args.estimator_checkpoint:
        runs.fail(
            "--estimator-checkpoint and --observed-reward exclude each other (--observed-reward trains on the "
            "observed reward, without an estimator)"
        )
    if not getattr(args, "observed_reward", False) and not args.estimator_checkpoint:
        runs.fail(f"--estimator-checkpoint is required: run stage 1 first, {ESTIMATOR_COMMAND} (see docs/groupdr.md)")
    if args.estimator_checkpoint and not os.path.isfile(args.estimator_checkpoint):
        runs.fail(f"--estimator-checkpoint: no such file '{args.estimator_checkpoint}'")
    check_groups(args.train_configs, args.allow_env6, args.train_days, "--train-configs")
    runs.check_counts(args)


def training_groups(args):
    """Stage 2's groups: --train-configs -> (the configs, {config: its building env, built once}), --train-days -> (a, b)."""
    configs = parse_configs(args.train_configs, args.allow_env6, "--train-configs")
    return configs, {config: envs.make_env("building", config) for config in configs}, parse_days(args.train_days)


# flag -> (accepted, test) of this script's numbers (tyro checks --fit and --architecture)
LIMITS = {
    "time_norm": ("> 0", lambda v: v > 0),
    "learning_rate": ("> 0", lambda v: v > 0),
    "fit_learning_rate": ("> 0", lambda v: v > 0),
    "behaviour_epsilon": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "val_fraction": ("in [0, 1)", lambda v: 0.0 <= v < 1.0),
    **{f: (">= 0", lambda v: v >= 0) for f in ("grad_clip", "hidden_dim", "episode_steps", "log_every", "torch_threads")},
    **{
        f: (">= 1", lambda v: v >= 1)
        for f in (
            "episodes",
            "buffer_size",
            "batch_size",
            "train_frequency",
            "episodes_per_config",
            "parallel_envs",
            "fit_steps",
            "fit_batch_size",
        )
    },
}


def check_args(args: Args) -> None:
    """One clear line naming the flag for every bad input, then exit != 0."""
    check_groups(args.configs, args.allow_env6, args.train_days)
    if args.architecture == "trunk" and args.fit == "online":
        runs.fail("--architecture trunk needs --fit offline (it standardises with statistics of the collected data)")
    if not args.behaviour_checkpoint:
        runs.fail(
            "--behaviour-checkpoint is required: train the VDN behaviour policy first with "
            f"'{BEHAVIOUR_COMMAND}', then pass --behaviour-checkpoint runs/groupdr_behaviour/model.pt"
        )
    if not os.path.isfile(args.behaviour_checkpoint):
        runs.fail(f"--behaviour-checkpoint: no such file '{args.behaviour_checkpoint}' (create it with '{BEHAVIOUR_COMMAND}')")
    for field, (accepted, ok) in LIMITS.items():
        if not ok(getattr(args, field)):
            runs.fail(f"--{field.replace('_', '-')} must be {accepted} (got {getattr(args, field)})")
    if args.batch_size > args.buffer_size:
        runs.fail(f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size} (drawn without replacement)")


# ---------------------------------------------------------------------------------------------
# Reward estimators: r_hat_k(s, a, t) for every training environment k (paper F.2 "GroupDR training")
# ---------------------------------------------------------------------------------------------
class ReleasedEstimator(nn.Module):
    """The released architecture (--architecture released): three embeddings of the raw inputs,
        e_s = ReLU(state_fc(s)),  e_a = ReLU(action_fc([onehot(a_1), ..., onehot(a_N)])),  e_t = ReLU(step_fc(t / time_norm)),
        r_hat = out_fc(ReLU(combined_fc([e_s, e_a, e_t])))      (B, K), column k = r_hat_k, in env reward units,
    every layer hidden_dim wide (64). action_fc is a plain Linear over the N * n_actions one-hot columns,
    computed as one weight-column lookup per agent (the same numbers, no 1200-wide one-hot). No input or
    reward scaling: the network regresses raw rewards on the raw 10-dim state (as released)."""

    def __init__(
        self, state_dim: int, n_agents: int, n_actions: int, n_heads: int, hidden_dim: int = 64, time_norm: float = 288.0
    ):
        super().__init__()
        self.state_dim, self.n_agents, self.n_actions, self.n_heads = state_dim, n_agents, n_actions, n_heads
        self.state_fc = nn.Linear(state_dim, hidden_dim)
        self.action_fc = nn.Linear(n_agents * n_actions, hidden_dim)
        self.step_fc = nn.Linear(1, hidden_dim)
        self.combined_fc = nn.Linear(3 * hidden_dim, hidden_dim)
        self.out_fc = nn.Linear(hidden_dim, n_heads)  # column k = head of env k
        self.register_buffer("time_norm", torch.tensor(float(time_norm)))
        self.register_buffer("agent_offsets", torch.arange(n_agents) * n_actions, persistent=False)

    def forward(self, state, actions, t):
        """state (B, state_dim) raw, actions (B, N) long, t (B,) step index -> (B, K) rewards."""
        e_s = F.relu(self.state_fc(state))
        e_a = F.relu(F.embedding(actions + self.agent_offsets, self.action_fc.weight.t()).sum(-2) + self.action_fc.bias)
        e_t = F.relu(self.step_fc((t.to(state.dtype) / self.time_norm).unsqueeze(-1)))
        return self.out_fc(F.relu(self.combined_fc(torch.cat([e_s, e_a, e_t], -1))))

    def fit_output(self, state, actions, t):
        """What the fit regresses (raw rewards)."""
        return self(state, actions, t)

    def fit_target(self, reward):
        return reward


class RewardEstimator(nn.Module):
    """--architecture trunk: a shared trunk on [standardised s, one-hot a_1..a_N, t / time_norm]
    -> Linear(., H) -> ReLU -> Linear(H, H) -> ReLU -> K heads, one per env (H = 128).

    The first layer is a plain Linear over the concatenated one-hot joint action; it is computed as
    the state/time columns plus one column lookup per agent (the same numbers, no 1200-wide one-hot).
    Input and reward standardisation live in buffers, so the state dict carries them:
    forward() takes raw states and raw step indices t and returns rewards in env units."""

    def __init__(
        self, state_dim: int, n_agents: int, n_actions: int, n_heads: int, hidden_dim: int = 128, time_norm: float = 288.0
    ):
        super().__init__()
        self.state_dim, self.n_agents, self.n_actions, self.n_heads = state_dim, n_agents, n_actions, n_heads
        self.fc1 = nn.Linear(state_dim + n_agents * n_actions + 1, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.heads = nn.Linear(hidden_dim, n_heads)  # column k = head of env k
        # One time normalisation everywhere: t / episode_limit (288). The released code divided by
        # 255 in the fit and by 288 in two of its stage-2 trainers; fit and use must agree, so it is stored here.
        self.register_buffer("time_norm", torch.tensor(float(time_norm)))
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))
        self.register_buffer("agent_offsets", torch.arange(n_agents) * n_actions, persistent=False)

    @torch.no_grad()
    def set_normalisation(self, states, rewards) -> None:
        """Standardise inputs and targets with the pooled statistics of the collected data."""
        states, rewards = torch.as_tensor(states, dtype=torch.float32), torch.as_tensor(rewards, dtype=torch.float32)
        self.state_mean.copy_(states.mean(0))
        self.state_std.copy_(states.std(0, unbiased=False).clamp_min(1e-6))
        self.reward_mean.copy_(rewards.mean())
        self.reward_std.copy_(rewards.std(unbiased=False).clamp_min(1e-6))

    def standardised(self, state, actions, t):
        """state (B, state_dim) raw, actions (B, N) long, t (B,) step index -> (B, K) standardised rewards."""
        s = (state - self.state_mean) / self.state_std
        x_in = torch.cat([s, (t.to(s.dtype) / self.time_norm).unsqueeze(-1)], -1)
        w = self.fc1.weight  # columns: [state | N one-hot blocks | time]
        D, NA = self.state_dim, self.n_agents * self.n_actions
        x = F.linear(x_in, torch.cat([w[:, :D], w[:, D + NA :]], 1), self.fc1.bias)
        x = x + F.embedding(actions + self.agent_offsets, w[:, D : D + NA].t()).sum(-2)  # one-hot joint action
        h = F.relu(self.fc2(F.relu(x)))
        return self.heads(h)

    def forward(self, state, actions, t):
        """r_hat_k(s, a, t) for every head k, in env reward units: (B, K)."""
        return self.standardised(state, actions, t) * self.reward_std + self.reward_mean

    def fit_output(self, state, actions, t):
        """What the fit regresses (standardised rewards)."""
        return self.standardised(state, actions, t)

    def fit_target(self, reward):
        return (reward - self.reward_mean) / self.reward_std


def make_estimator(
    architecture: str,
    state_dim: int,
    n_agents: int,
    n_actions: int,
    n_heads: int,
    hidden_dim: int = 0,
    time_norm: float = 288.0,
):
    """--architecture released | trunk; hidden_dim 0 = the architecture's own width (64 | 128)."""
    cls = ReleasedEstimator if architecture == "released" else RewardEstimator
    return cls(state_dim, n_agents, n_actions, n_heads, hidden_dim or ARCHITECTURES[architecture], time_norm)


@torch.no_grad()
def worst_case_reward(estimator, state, actions, t):
    """r_tilde(s, a, t) = min_k r_hat_k(s, a, t): the worst group's predicted reward, per sample (B,). Stage 2 puts it
    in place of r in the nominal target (Alg. 2 l.15 at rho = 0, Eq. (15)); a constant there (the estimator is
    frozen: no gradient reaches it)."""
    return estimator(state, actions, t).min(-1).values


class EstimatorError(ValueError):
    """A bad estimator checkpoint; the message is one line (the caller prefixes the flag)."""


def load_estimator(path: str, n_agents: int, n_actions: int, state_dim: int, device="cpu"):
    """-> (estimator in eval mode, checkpoint dict). EstimatorError for any bad file. A checkpoint without
    an "architecture" entry (written before the released architecture existed) is a trunk."""
    if not path:
        raise EstimatorError(f"is required (write one with {ESTIMATOR_COMMAND}, see docs/groupdr.md)")
    if not os.path.isfile(path):
        raise EstimatorError(f"no such file '{path}'")
    try:  # tensors and plain types only: a downloaded file cannot run code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise EstimatorError(
            f"cannot read '{path}' as a torch checkpoint of tensors and plain types ({type(e).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != ESTIMATOR_FORMAT:
        raise EstimatorError(f"'{path}' is not a GroupDR estimator checkpoint (written by algos/groupdr_estimator.py)")
    try:
        got = {"n_agents": int(ckpt["n_agents"]), "n_actions": int(ckpt["n_actions"]), "state_dim": int(ckpt["state_dim"])}
        want = {"n_agents": n_agents, "n_actions": n_actions, "state_dim": state_dim}
        bad = [f"{k} {got[k]} != {want[k]}" for k in want if got[k] != want[k]]
        if bad:
            raise EstimatorError(f"'{path}' does not match this environment: {', '.join(bad)}")
        architecture = ckpt.get("architecture", "trunk")
        if architecture not in ARCHITECTURES:
            raise EstimatorError(f"'{path}' has an unknown architecture '{architecture}'")
        estimator = make_estimator(
            architecture, state_dim, n_agents, n_actions, len(ckpt["configs"]), ckpt["hidden_dim"], ckpt["time_norm"]
        )
        estimator.load_state_dict(ckpt["estimator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, EstimatorError):
            raise
        raise EstimatorError(f"'{path}' is damaged: {type(e).__name__} {str(e).splitlines()[0] if str(e) else ''}") from None
    return estimator.to(device).eval(), ckpt


def stage_estimator(args, n_agents: int, n_actions: int, state_dim: int, device, train_configs):
    """Stage 2's frozen estimator from --estimator-checkpoint, with its head configs (None, None with
    --observed-reward); a bad file, or an env_6 head without --allow-env6, stops with one error line."""
    if getattr(args, "observed_reward", False):  # stage 0: plain VDN with domain randomisation
        print(f"observed reward, no estimator: plain VDN on episodes from {','.join(train_configs)}", flush=True)
        return None, None
    try:
        estimator, ckpt = load_estimator(args.estimator_checkpoint, n_agents, n_actions, state_dim, device)
    except EstimatorError as e:
        runs.fail(f"--estimator-checkpoint: {e}")
    if HELD_OUT_CONFIG in ckpt["configs"] and not args.allow_env6:  # env_6 data = training on env_6
        runs.fail(
            f"--estimator-checkpoint: its heads include {HELD_OUT_CONFIG}, the held-out test config "
            "(fitted with --allow-env6); pass --allow-env6 to train with it anyway"
        )
    print(
        f"estimator {args.estimator_checkpoint}: heads {','.join(ckpt['configs'])}, time t/{ckpt['time_norm']:g}; "
        f"training episodes from {','.join(train_configs)}",
        flush=True,
    )
    return estimator, ckpt["configs"]


# ---------------------------------------------------------------------------------------------
# Behaviour policy
# ---------------------------------------------------------------------------------------------
def load_behaviour(path: str, device):
    """A model.pt of algos/<algo>.py --save-model (read with weights_only, runs.load_model) -> (the script as a module,
    its q_network, the model.pt dict). The network class is the training script's own, as eval.py does."""
    ckpt = runs.load_model(path, "--behaviour-checkpoint", device)
    a, e = ckpt["args"], ckpt["env"]
    if e.get("env") != "building":
        runs.fail(f"--behaviour-checkpoint: '{path}' was trained on --env {e.get('env')}; GroupDR needs a building policy")
    try:
        module = evaluation.load_algo_module(ckpt["algo"])
        net = module.QNetworks(e["n_agents"], e["obs_dim"], e["n_actions"], a["hidden_dim"], a["share_params"])
        evaluation.load_q_network(net, ckpt)
    except (ValueError, RuntimeError, KeyError) as err:
        runs.fail(f"--behaviour-checkpoint: '{path}' does not match its network: {str(err).splitlines()[0]}")
    if not (ckpt["algo"] == "robust_vdn_rho" or (ckpt["algo"] == "groupdr_vdn" and a.get("observed_reward"))):
        print(
            f"warning: the behaviour policy is {ckpt['algo']}; the paper uses a VDN-trained one "
            f"(released: plain VDN on env_1..env_5, '{BEHAVIOUR_COMMAND}')",
            file=sys.stderr,
        )
    return module, net.to(device).eval(), ckpt


def behaviour_actions(module, q_network, history, avail, epsilon, joint_coin, rng, device="cpu"):
    """Epsilon-greedy joint action of one episode step (Alg. 2 l.8; avail (N, A)): random actions uniform over the
    available ones, then the coins, one for all agents (joint_coin, released) or one per agent; the greedy pass of the
    behaviour network only runs when some agent acts greedily (same numbers, half the passes at 0.5)."""
    N = avail.shape[0]
    random_actions = np.argmax(rng.random(avail.shape) * avail, axis=-1)
    coins = rng.random(1).repeat(N) if joint_coin else rng.random(N)
    if (coins < epsilon).all():
        return random_actions
    with torch.no_grad():
        q = q_network.greedy_q(*history.tensors(device))[0]
    greedy = module.masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
    return np.where(coins < epsilon, random_actions, greedy)


# ---------------------------------------------------------------------------------------------
# --fit online (released): fit while the behaviour episodes are played
# ---------------------------------------------------------------------------------------------
class BanditReplay:
    """The last `capacity` transitions (s, a, k, r, t): state, joint action, group (head) k, team reward,
    step index in the day. Minibatches are drawn uniformly without replacement (as released)."""

    def __init__(self, capacity: int, state_dim: int, n_agents: int):
        self.capacity, self.ptr, self.size = capacity, 0, 0
        self.state = np.zeros((capacity, state_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, n_agents), dtype=np.int64)
        self.head = np.zeros(capacity, dtype=np.int64)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.t = np.zeros(capacity, dtype=np.int64)

    def add(self, state, actions, head, reward, t):
        i = self.ptr
        self.state[i], self.actions[i], self.head[i], self.reward[i], self.t[i] = state, actions, head, reward, t
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, rng):
        return rng.choice(self.size, batch_size, replace=False)

    def tensors(self, idx, device="cpu"):
        """(state, actions, head, reward, t) of slots idx as tensors."""
        return tuple(torch.from_numpy(x[idx]).to(device) for x in (self.state, self.actions, self.head, self.reward, self.t))


def estimator_update(estimator, optimizer, replay, idx, grad_clip, device="cpu") -> float:
    """One fitting step on the transitions idx: the output of head k_j of transition j regresses its reward
    r_j (MSE over the batch, each transition only trains its own group's head), gradient-norm clip
    (0 = none), optimiser step. -> the loss before the step."""
    state, actions, head, reward, t = replay.tensors(idx, device)
    pred = estimator.fit_output(state, actions, t).gather(1, head.unsqueeze(1)).squeeze(1)
    loss = F.mse_loss(pred, estimator.fit_target(reward))
    optimizer.zero_grad()
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(estimator.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def fit_online(
    estimator,
    tasks,
    behaviour,
    episodes,
    days,
    epsilon,
    joint_coin,
    episode_steps,
    buffer_size,
    batch_size,
    train_frequency,
    learning_rate,
    grad_clip,
    rng,
    device="cpu",
    writer=None,
    log_every=0,
):
    """The released fit. tasks: one env per head k; behaviour: (module, q_network, window). Every episode
    draws its group k uniformly and its day uniformly in days = [a, b), and plays the epsilon-greedy
    behaviour policy; every transition (s_t, a_t, k, r_t, t) is stored, and after every train_frequency-th
    stored transition (once batch_size are stored) estimator_update runs on batch_size of them (Adam,
    learning_rate). -> stats (per-episode group and return, losses, per-head fit on the final replay)."""
    module, q_network, window = behaviour
    N, obs_dim = tasks[0].n_agents, tasks[0].obs_dim
    replay = BanditReplay(buffer_size, tasks[0].state_dim, N)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=learning_rate, fused=True)
    history = envs.History(1, window, N, obs_dim)
    estimator.train()
    n_stored, losses, heads, returns, idx, start, cpu_start = 0, [], [], [], None, time.time(), time.process_time()
    for episode in range(episodes):
        k = int(rng.integers(len(tasks)))
        task = tasks[k]
        obs, state, avail = task.reset(int(rng.integers(days[0], days[1])))
        history.reset(obs[None])
        episode_return = 0.0
        for t in range(min(episode_steps or task.episode_limit, task.episode_limit)):
            actions = behaviour_actions(module, q_network, history, avail, epsilon, joint_coin, rng, device)
            next_obs, next_state, next_avail, reward, terminated, truncated, _ = task.step(actions)
            replay.add(state, actions, k, reward, t)
            n_stored += 1
            episode_return += reward
            if replay.size >= batch_size and n_stored % train_frequency == 0:
                idx = replay.sample(batch_size, rng)
                losses.append(estimator_update(estimator, optimizer, replay, idx, grad_clip, device))
                if writer is not None and len(losses) % 100 == 0:
                    writer.add_scalar("losses/estimator_loss", float(np.mean(losses[-100:])), n_stored)
            history.push(next_obs[None], actions[None])
            obs, state, avail = next_obs, next_state, next_avail
            if terminated or truncated:
                break
        heads.append(k)
        returns.append(episode_return)
        if writer is not None:
            writer.add_scalar("charts/episodic_return", episode_return, n_stored)
            writer.add_scalar("charts/normalised_return", envs.normalised_return(episode_return), n_stored)
            writer.add_scalar("charts/SPS", int(n_stored / (time.time() - start)), n_stored)
        if log_every and ((episode + 1) % log_every == 0 or episode + 1 == episodes):
            recent = float(np.mean(losses[-1000:])) if losses else float("nan")
            print(
                f"episode {episode + 1}/{episodes} | transitions {n_stored} | updates {len(losses)} | "
                f"loss (last 1000 updates) {recent:.3f} | episodes/s {(episode + 1) / (time.time() - start):.2f}",
                flush=True,
            )
    estimator.eval()
    with torch.no_grad():  # the fit on the transitions still in the replay (the last buffer_size)
        state, actions, head, reward, t = replay.tensors(np.arange(replay.size), device)
        pred = estimator(state, actions, t)
        own = pred.gather(1, head.unsqueeze(1)).squeeze(1)
        mse = [
            F.mse_loss(own[head == k], reward[head == k]).item() if (head == k).any() else float("nan")
            for k in range(len(tasks))
        ]
        min_share = torch.bincount(pred.argmin(-1), minlength=len(tasks)).float() / max(replay.size, 1)
    return {
        "mode": "online",
        "episodes": episodes,
        "transitions": n_stored,
        "updates": len(losses),
        "episodes_per_head": np.bincount(heads, minlength=len(tasks)).tolist(),
        "heads": heads,
        "returns": returns,
        "loss_first_1000": float(np.mean(losses[:1000])) if losses else float("nan"),
        "loss_last_1000": float(np.mean(losses[-1000:])) if losses else float("nan"),
        "replay_mse": mse,
        "replay_reward_var": [
            float(reward[head == k].var(unbiased=False)) if (head == k).any() else float("nan") for k in range(len(tasks))
        ],
        "min_head_share": min_share.tolist(),
        "seconds": time.time() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "last_batch": None if idx is None else idx.tolist(),
        "replay": replay,
    }


# ---------------------------------------------------------------------------------------------
# --fit offline: collect every group's episodes first, then fit
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def collect(module, q_network, tasks, days, window, epsilon, episode_steps, rng, device="cpu", joint_coin=False):
    """Run len(days) episodes of one config with the epsilon-greedy behaviour policy, len(tasks) at a
    time in lockstep (one batched greedy pass per step). Each agent flips its own epsilon coin, or all
    agents one (joint_coin). Every transition is kept, the last one of the day included (the released
    code drops it). -> dict of arrays state, actions, t, reward, returns."""
    N, A, obs_dim = tasks[0].n_agents, tasks[0].n_actions, tasks[0].obs_dim
    limit = min(episode_steps or tasks[0].episode_limit, tasks[0].episode_limit)
    out = {"state": [], "actions": [], "t": [], "reward": [], "returns": []}
    for start in range(0, len(days), len(tasks)):
        chunk = days[start : start + len(tasks)]
        lanes = tasks[: len(chunk)]
        first = [task.reset(day) for task, day in zip(lanes, chunk)]
        obs = np.stack([f[0] for f in first])
        state = np.stack([f[1] for f in first])
        avail = np.stack([f[2] for f in first])
        history = envs.History(len(lanes), window, N, obs_dim)
        history.reset(obs)
        returns, done = np.zeros(len(lanes)), np.zeros(len(lanes), dtype=bool)
        for t in range(limit):
            q = q_network.greedy_q(*history.tensors(device))
            greedy = module.masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
            random_actions = np.argmax(rng.random((len(lanes), N, A)) * avail, axis=-1)  # uniform over available
            coins = rng.random((len(lanes), 1)).repeat(N, 1) if joint_coin else rng.random((len(lanes), N))
            actions = np.where(coins < epsilon, random_actions, greedy)
            for e in np.flatnonzero(~done):
                o, s, av, r, term, trunc, _ = lanes[e].step(actions[e])
                out["state"].append(state[e].copy())
                out["actions"].append(actions[e].copy())
                out["t"].append(t)
                out["reward"].append(r)
                obs[e], state[e], avail[e] = o, s, av
                returns[e] += r
                done[e] = term or trunc
            history.push(obs, actions)
            if done.all():
                break
        out["returns"].extend(returns.tolist())
    return {
        "state": np.asarray(out["state"], dtype=np.float32).reshape(-1, tasks[0].state_dim),
        "actions": np.asarray(out["actions"], dtype=np.int64).reshape(-1, N),
        "t": np.asarray(out["t"], dtype=np.int64),
        "reward": np.asarray(out["reward"], dtype=np.float32),
        "returns": np.asarray(out["returns"]),
    }


def fit_estimator(
    estimator, data, steps, batch_size, learning_rate, val_fraction, rng, device="cpu", writer=None, log_every=0
):
    """--fit offline. data: one dict per head k (keys state, actions, t, reward). Every step draws batch_size
    transitions from each environment and minimises the mean over k of head k's MSE on its own
    environment's batch. -> per-head train/val MSE in env reward units, and min-head shares."""
    tensors, splits = [], []
    for d in data:
        n = len(d["reward"])
        perm = rng.permutation(n)
        n_val = round(val_fraction * n) if n > 1 else 0
        splits.append((perm[n_val:], perm[:n_val]))
        tensors.append({k: torch.from_numpy(np.asarray(d[k])).to(device) for k in ("state", "actions", "t", "reward")})
    if hasattr(estimator, "set_normalisation"):  # the trunk standardises with the pooled training split
        train_states = torch.cat([tb["state"][torch.from_numpy(tr).to(device)] for tb, (tr, _) in zip(tensors, splits)])
        train_rewards = torch.cat([tb["reward"][torch.from_numpy(tr).to(device)] for tb, (tr, _) in zip(tensors, splits)])
        estimator.set_normalisation(train_states, train_rewards)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=learning_rate)
    estimator.train()
    start = time.time()
    for step in range(steps):
        loss = 0.0
        for k, (tb, (tr, _)) in enumerate(zip(tensors, splits)):
            idx = torch.from_numpy(tr[rng.integers(0, len(tr), batch_size)]).to(device)
            pred = estimator.fit_output(tb["state"][idx], tb["actions"][idx], tb["t"][idx])[:, k]
            loss = loss + F.mse_loss(pred, estimator.fit_target(tb["reward"][idx]))
        loss = loss / len(tensors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if writer is not None and (step % 100 == 0 or step + 1 == steps):
            writer.add_scalar("losses/estimator_loss", loss.item(), step)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(
                f"fit step {step + 1}/{steps} | fit MSE {loss.item():.4f} | steps/s {(step + 1) / (time.time() - start):.0f}",
                flush=True,
            )
    estimator.eval()

    @torch.no_grad()
    def mse(k, idx):
        if len(idx) == 0:
            return float("nan")
        tb, i = tensors[k], torch.from_numpy(idx).to(device)
        return F.mse_loss(estimator(tb["state"][i], tb["actions"][i], tb["t"][i])[:, k], tb["reward"][i]).item()

    with torch.no_grad():  # which head is the minimum, over all collected transitions
        argmins = torch.cat([estimator(tb["state"], tb["actions"], tb["t"]).argmin(-1) for tb in tensors])
        min_share = torch.bincount(argmins, minlength=len(tensors)).float() / len(argmins)
    return {
        "mode": "offline",
        "train_mse": [mse(k, tr) for k, (tr, _) in enumerate(splits)],
        "val_mse": [mse(k, va) for k, (_, va) in enumerate(splits)],
        "reward_var": [float(np.var(d["reward"])) for d in data],
        "min_head_share": min_share.tolist(),
    }


if __name__ == "__main__":
    args = runs.parse_args(Args, __file__, check_args)  # one error line per bad flag
    configs = parse_configs(args.configs, args.allow_env6)
    day_lo, day_hi = parse_days(args.train_days)
    run_name = args.run_name or f"building__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)

    # Seeding: python, numpy, torch, groups, days, exploration and minibatches from one --seed
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-fill of every torch.empty (~1 ms a step)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    # Behaviour policy: a VDN-trained checkpoint (paper F.2; released: plain VDN on env_1..env_5)
    module, behaviour, b_ckpt = load_behaviour(args.behaviour_checkpoint, device)
    b_env, b_args = b_ckpt["env"], b_ckpt["args"]

    # One env per group (env_6 never, unless --allow-env6); offline collection runs --parallel-envs of each
    n_lanes = 1 if args.fit == "online" else min(args.parallel_envs, args.episodes_per_config)
    lanes = {config: [envs.make_env("building", config) for _ in range(n_lanes)] for config in configs}
    task = lanes[configs[0]][0]
    if (b_env["n_agents"], b_env["n_actions"], b_env["obs_dim"]) != (task.n_agents, task.n_actions, task.obs_dim):
        runs.fail(
            f"--behaviour-checkpoint: its network has n_agents {b_env['n_agents']}, n_actions "
            f"{b_env['n_actions']}, obs_dim {b_env['obs_dim']}; {configs[0]} has {task.n_agents}, "
            f"{task.n_actions}, {task.obs_dim}"
        )
    writer = SummaryWriter(run_dir)  # the run folder, once every input is checked
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    runs.write_json_atomic(os.path.join(run_dir, "args.json"), vars(args))
    hidden_dim = args.hidden_dim or ARCHITECTURES[args.architecture]
    estimator = make_estimator(
        args.architecture, task.state_dim, task.n_agents, task.n_actions, len(configs), hidden_dim, args.time_norm
    ).to(device)
    joint_coin = not args.per_agent_coins
    print(
        f"estimator: {args.architecture} {hidden_dim} wide, fit {args.fit}, heads {','.join(configs)}, time "
        f"t/{args.time_norm:g}; behaviour {args.behaviour_checkpoint} ({'joint' if joint_coin else 'per-agent'} "
        f"coin, epsilon {args.behaviour_epsilon:g})",
        flush=True,
    )

    if args.fit == "online":  # released: fitted while 1000 behaviour episodes are played
        fit = fit_online(
            estimator,
            [lanes[c][0] for c in configs],
            (module, behaviour, b_args["window"]),
            args.episodes,
            (day_lo, day_hi),
            args.behaviour_epsilon,
            joint_coin,
            args.episode_steps,
            args.buffer_size,
            args.batch_size,
            args.train_frequency,
            args.learning_rate,
            args.grad_clip,
            rng,
            device,
            writer,
            args.log_every or 50,
        )
        fit.pop("replay")
        for k, config in enumerate(configs):
            writer.add_scalar(f"losses/replay_mse_{config}", fit["replay_mse"][k], fit["transitions"])
            print(
                f"{config}: {fit['episodes_per_head'][k]} episodes | MSE on the final replay {fit['replay_mse'][k]:.3f} "
                f"| reward variance {fit['replay_reward_var'][k]:.3f} | min head on "
                f"{100 * fit['min_head_share'][k]:.1f}% of the replay"
            )
        print(
            f"{fit['episodes']} episodes, {fit['transitions']} transitions, {fit['updates']} updates in "
            f"{fit['seconds']:.0f} s ({fit['episodes'] / max(fit['seconds'], 1e-9):.2f} episodes/s; CPU "
            f"{fit['cpu_seconds']:.0f} s, {fit['episodes'] / max(fit['cpu_seconds'], 1e-9):.2f} episodes per CPU second)"
        )
    else:  # collect every group's episodes first, then fit
        data, global_step, start_time = [], 0, time.time()
        for k, config in enumerate(configs):
            days = rng.integers(day_lo, day_hi, args.episodes_per_config).tolist()
            d = collect(
                module,
                behaviour,
                lanes[config],
                days,
                b_args["window"],
                args.behaviour_epsilon,
                args.episode_steps,
                rng,
                device,
                joint_coin,
            )
            for ret in d["returns"]:
                global_step += len(d["reward"]) // len(d["returns"])
                writer.add_scalar("charts/episodic_return", ret, global_step)
                writer.add_scalar("charts/normalised_return", envs.normalised_return(ret), global_step)
            writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
            print(
                f"collected {config}: {len(d['returns'])} episodes, {len(d['reward'])} transitions | return "
                f"{d['returns'].mean():.1f} | reward mean {d['reward'].mean():.2f} std {d['reward'].std():.2f}",
                flush=True,
            )
            data.append(d)
        # Fit r_hat_k on env k's data (one head per environment)
        fit = fit_estimator(
            estimator,
            data,
            args.fit_steps,
            args.fit_batch_size,
            args.fit_learning_rate,
            args.val_fraction,
            rng,
            device,
            writer,
            args.log_every or 500,
        )
        for k, config in enumerate(configs):
            writer.add_scalar(f"losses/val_mse_{config}", fit["val_mse"][k], args.fit_steps)
            print(
                f"{config}: train MSE {fit['train_mse'][k]:.3f} | val MSE {fit['val_mse'][k]:.3f} | reward variance "
                f"{fit['reward_var'][k]:.3f} | min head on {100 * fit['min_head_share'][k]:.1f}% of transitions"
            )

    # Estimator checkpoint, written atomically
    path = os.path.join(run_dir, "estimator.pt")
    normalisation = {"time": f"t / {args.time_norm:g}"}
    if args.architecture == "trunk":
        normalisation.update(
            state_mean=estimator.state_mean.tolist(),
            state_std=estimator.state_std.tolist(),
            reward_mean=estimator.reward_mean.item(),
            reward_std=estimator.reward_std.item(),
        )
    checkpoint = {  # tensors and plain types only: load_estimator reads it with torch.load(weights_only=True)
        "format": ESTIMATOR_FORMAT,
        "algo": os.path.basename(__file__)[: -len(".py")],
        "args": vars(args),
        "configs": configs,  # head k = configs[k]
        "n_agents": task.n_agents,
        "n_actions": task.n_actions,
        "state_dim": task.state_dim,
        "architecture": args.architecture,
        "hidden_dim": hidden_dim,
        "time_norm": args.time_norm,
        "normalisation": normalisation,
        "behaviour": {
            "checkpoint": os.path.abspath(args.behaviour_checkpoint),
            "algo": b_ckpt["algo"],
            "rho": b_args.get("rho"),
            "epsilon": args.behaviour_epsilon,
            "joint_coin": joint_coin,
        },
        "fit": fit,
        "estimator": estimator.state_dict(),
    }
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"estimator saved to {path}")
    writer.close()
