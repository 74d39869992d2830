"""GroupDR's worst-case reward r_tilde(s, a, t) = min_k r_hat_k(s, a, t) (paper F.2, "GroupDR training"): the groups,
the reward estimator networks r_hat_k, their checkpoint, and the frozen estimator stage 2 reads.

GroupDR (Liu et al., 2025) treats each training config env_k as a group. Stage 1 (algos/groupdr_estimator.py) fits one
reward model per group on behaviour episodes and writes estimator.pt (save_estimator); stage 2
(algos/groupdr_{vdn,qmix,qtran}.py) loads it (stage_estimator) and puts r_tilde in place of r in the nominal TD target
(Alg. 2 l.15 at rho = 0, Eq. (15)). Both stages take their groups from here (parse_configs, training_groups): env_6
is never a group (paper F.2: "Env_6 is never used for training by any method") unless --allow-env6 is given.
Docs: docs/groupdr.md.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

import envs  # the building configs
import runs  # run plumbing: one-line errors (runs.fail), count checks

ESTIMATOR_FORMAT = "drigm-groupdr-estimator-v1"
TRAIN_CONFIGS = "env_1,env_2,env_3,env_4,env_5"  # paper F.2: GroupDR's groups; env_6 is held out
HELD_OUT_CONFIG = "env_6"
ESTIMATOR_COMMAND = (
    "python algos/groupdr_estimator.py --behaviour-checkpoint runs/groupdr_behaviour/model.pt --run-name groupdr_estimator"
)
ARCHITECTURES = {"released": 64, "trunk": 128}  # architecture -> its default width (--hidden-dim 0)


# ---------------------------------------------------------------------------------------------
# Groups: the training configs (--configs of stage 1, --train-configs of stage 2) and days
# ---------------------------------------------------------------------------------------------
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


def save_estimator(path: str, estimator, args, configs, task, behaviour_ckpt: dict, fit: dict) -> None:
    """Write stage 1's estimator.pt atomically (tmp file, then rename): tensors and plain types only, so that
    load_estimator reads it with torch.load(weights_only=True). Head k is configs[k]; the trunk's standardisation
    statistics are also written in plain numbers (they live in its state dict). behaviour_ckpt: the behaviour's model.pt."""
    normalisation = {"time": f"t / {args.time_norm:g}"}
    if args.architecture == "trunk":
        normalisation.update(
            state_mean=estimator.state_mean.tolist(),
            state_std=estimator.state_std.tolist(),
            reward_mean=estimator.reward_mean.item(),
            reward_std=estimator.reward_std.item(),
        )
    checkpoint = {
        "format": ESTIMATOR_FORMAT,
        "algo": "groupdr_estimator",
        "args": vars(args),
        "configs": configs,  # head k = configs[k]
        "n_agents": task.n_agents,
        "n_actions": task.n_actions,
        "state_dim": task.state_dim,
        "architecture": args.architecture,
        "hidden_dim": args.hidden_dim or ARCHITECTURES[args.architecture],
        "time_norm": args.time_norm,
        "normalisation": normalisation,
        "behaviour": {
            "checkpoint": os.path.abspath(args.behaviour_checkpoint),
            "algo": behaviour_ckpt["algo"],
            "rho": behaviour_ckpt["args"].get("rho"),
            "epsilon": args.behaviour_epsilon,
            "joint_coin": not args.per_agent_coins,
        },
        "fit": fit,
        "estimator": estimator.state_dict(),
    }
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


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
