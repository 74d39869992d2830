"""GroupDR stage 1: the contextual-bandit worst-case reward estimator (paper F.2, "GroupDR training").

    python algos/robust_vdn_rho.py --rho 0 --save-model --run-name groupdr_behaviour   # VDN behaviour policy
    python algos/groupdr_estimator.py --behaviour-checkpoint runs/groupdr_behaviour/model.pt --run-name groupdr_estimator

GroupDR (Liu et al., 2025, group distributionally robust MARL) treats each training environment
env_k as a group. Stage 1 collects data from env_1..env_5 with a VDN-trained behaviour policy and
fits one reward model per group, r_hat_k(s, a, t) (a contextual bandit: context (s, t), arm = the
joint action a). Stage 2 (algos/groupdr_{vdn,qmix,qtran}.py) trains the agents with the worst
group's predicted reward r_tilde = min_k r_hat_k(s, a, t) in the TD target. env_6 is never used
for training (paper F.2), so this script refuses it unless --allow-env6 is given.

Architecture (the paper gives none): one shared trunk
    [standardised state (state_dim), one-hot a_1, ..., one-hot a_N (N * n_actions), t / 288]
    -> Linear(., 128) -> ReLU -> Linear(128, 128) -> ReLU
and one linear output head per training environment (Linear(128, K), column k = r_hat_k). Heads
are trained by MSE on their own environment's data only, on standardised rewards.
Docs: docs/groupdr.md (usage, metrics, implementation details).

Deviations from the authors' released code, on purpose: (1) its estimator was fitted on data from
all six configs, env_6 included; here the default is env_1..env_5 and env_6 needs --allow-env6
(paper F.2: "Env_6 is never used for training by any method"); (2) its time feature was t / 255 in
one place and t / 288 in another; here it is t / 288 (the episode limit) everywhere, stored in
the checkpoint as time_norm and applied inside RewardEstimator, so stage 2 cannot disagree;
(3) the last transition of every day is kept (the released code drops it).
"""

import importlib.util
import json
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
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402  (environment plumbing shared by all scripts)
import eval as evaluation  # noqa: E402  (checkpoint formats)

ESTIMATOR_FORMAT = "drigm-groupdr-estimator-v1"
TRAIN_CONFIGS = "env_1,env_2,env_3,env_4,env_5"  # paper F.2: GroupDR's groups; env_6 is held out
HELD_OUT_CONFIG = "env_6"
BEHAVIOUR_COMMAND = "python algos/robust_vdn_rho.py --rho 0 --save-model --run-name groupdr_behaviour"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    run_name: str = ""
    """run folder under runs/ (default: building__{exp_name}__{seed}__{unix time})"""
    seed: int = 1
    """seed of python, numpy, torch, the collection days, exploration and minibatches"""
    device: str = "cpu"
    """torch device (cpu or cuda)"""
    torch_threads: int = 0
    """torch intra-op threads (0 = torch's default; 1 is fastest on a 2-core machine)"""
    log_every: int = 500
    """print a progress line every this many fitting steps"""

    # Environment
    configs: str = TRAIN_CONFIGS
    """comma-separated building configs, one estimator head (group) each (paper F.2: env_1..env_5)"""
    allow_env6: bool = False
    """allow env_6 in --configs (the released code's estimator saw it; the paper never trains on it)"""
    train_days: str = "0:200"
    """day-of-year range [a, b) each collected episode is drawn from (paper: days 0-199)"""
    episode_steps: int = 0
    """cap on steps per episode, a time limit (0 = the env's own limit, 288)"""

    # Behaviour policy and data collection
    behaviour_checkpoint: str = ""
    """model.pt of the VDN behaviour policy (algos/robust_vdn_rho.py --save-model); required"""
    behaviour_epsilon: float = 0.5
    """epsilon of the epsilon-greedy behaviour policy (released code: 0.5)"""
    episodes_per_config: int = 40
    """episodes collected in every config (paper silent)"""
    parallel_envs: int = 10
    """episodes of one config run in lockstep, one batched network pass per step"""

    # Estimator fit (paper silent on all of these)
    hidden_dim: int = 128
    """width of the two hidden layers of the shared trunk"""
    fit_steps: int = 5000
    """Adam steps of the estimator fit"""
    fit_batch_size: int = 256
    """transitions per environment in every fitting minibatch"""
    fit_learning_rate: float = 1e-3
    """Adam learning rate of the estimator"""
    val_fraction: float = 0.1
    """fraction of each environment's transitions held out to report the fit"""


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


def check_args(args: Args) -> None:
    """One clear line naming the flag for every bad input, then exit != 0."""
    try:
        parse_configs(args.configs, args.allow_env6)
        parse_days(args.train_days)
    except envs.EnvArgError as e:
        envs.fail(str(e))
    if not args.behaviour_checkpoint:
        envs.fail(
            "--behaviour-checkpoint is required: train the VDN behaviour policy first with "
            f"'{BEHAVIOUR_COMMAND}', then pass --behaviour-checkpoint runs/groupdr_behaviour/model.pt"
        )
    if not os.path.isfile(args.behaviour_checkpoint):
        envs.fail(f"--behaviour-checkpoint: no such file '{args.behaviour_checkpoint}' (create it with '{BEHAVIOUR_COMMAND}')")
    if not 0.0 <= args.behaviour_epsilon <= 1.0:
        envs.fail(f"--behaviour-epsilon must be in [0, 1] (got {args.behaviour_epsilon})")
    if not 0.0 <= args.val_fraction < 1.0:
        envs.fail(f"--val-fraction must be in [0, 1) (got {args.val_fraction})")
    for flag, value in [("--episodes-per-config", args.episodes_per_config), ("--parallel-envs", args.parallel_envs),
                        ("--hidden-dim", args.hidden_dim), ("--fit-steps", args.fit_steps),
                        ("--fit-batch-size", args.fit_batch_size)]:
        if value < 1:
            envs.fail(f"{flag} must be >= 1 (got {value})")


# ---------------------------------------------------------------------------------------------
# Reward estimator: r_hat_k(s, a, t) for every training environment k (paper F.2 "GroupDR training")
# ---------------------------------------------------------------------------------------------
class RewardEstimator(nn.Module):
    """Shared trunk on [standardised s, one-hot a_1..a_N, t / time_norm] -> K heads, one per env.

    The first layer is a plain Linear over the concatenated one-hot joint action; it is computed as
    the state/time columns plus one column lookup per agent (the same numbers, no 1200-wide one-hot).
    Input and reward standardisation live in buffers, so the state dict carries them:
    forward() takes raw states and raw step indices t and returns rewards in env units."""

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, n_heads: int, hidden_dim: int = 128,
                 time_norm: float = 288.0):
        super().__init__()
        self.state_dim, self.n_agents, self.n_actions, self.n_heads = state_dim, n_agents, n_actions, n_heads
        self.fc1 = nn.Linear(state_dim + n_agents * n_actions + 1, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.heads = nn.Linear(hidden_dim, n_heads)  # column k = head of env k
        # One time normalisation everywhere: t / episode_limit (288). The released code divided by
        # 255 in one place and by 288 in another; fit and use must agree, so it is stored here.
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


def worst_case_reward(estimator, state, actions, t):
    """r_tilde(s, a, t) = min_k r_hat_k(s, a, t): the worst group's predicted reward, per sample (B,)."""
    return estimator(state, actions, t).min(-1).values


class EstimatorError(ValueError):
    """A bad estimator checkpoint; the message is one line (the caller prefixes the flag)."""


def load_estimator(path: str, n_agents: int, n_actions: int, state_dim: int, device="cpu"):
    """-> (RewardEstimator in eval mode, checkpoint dict). EstimatorError for any bad file."""
    if not path:
        raise EstimatorError("is required (write one with python algos/groupdr_estimator.py, see docs/groupdr.md)")
    if not os.path.isfile(path):
        raise EstimatorError(f"no such file '{path}'")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise EstimatorError(f"cannot read '{path}' as a torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != ESTIMATOR_FORMAT:
        raise EstimatorError(f"'{path}' is not a GroupDR estimator checkpoint (written by algos/groupdr_estimator.py)")
    try:
        got = {"n_agents": int(ckpt["n_agents"]), "n_actions": int(ckpt["n_actions"]), "state_dim": int(ckpt["state_dim"])}
        want = {"n_agents": n_agents, "n_actions": n_actions, "state_dim": state_dim}
        bad = [f"{k} {got[k]} != {want[k]}" for k in want if got[k] != want[k]]
        if bad:
            raise EstimatorError(f"'{path}' does not match this environment: {', '.join(bad)}")
        estimator = RewardEstimator(state_dim, n_agents, n_actions, len(ckpt["configs"]), ckpt["hidden_dim"],
                                    ckpt["time_norm"])
        estimator.load_state_dict(ckpt["estimator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, EstimatorError):
            raise
        raise EstimatorError(f"'{path}' is damaged: {type(e).__name__} {str(e).splitlines()[0] if str(e) else ''}") from None
    return estimator.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------
# Behaviour policy and data collection
# ---------------------------------------------------------------------------------------------
def load_behaviour(path: str, device):
    """A checkpoint of algos/<algo>.py --save-model -> (its module, q_network, env dict, args dict).
    The network class is taken from the training script itself, as eval.py does."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001
        envs.fail(f"--behaviour-checkpoint: cannot read '{path}' as a torch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") not in evaluation.CHECKPOINT_FORMATS:
        envs.fail(f"--behaviour-checkpoint: '{path}' is not a checkpoint written by algos/*.py --save-model "
                  f"(create one with '{BEHAVIOUR_COMMAND}')")
    a, e = ckpt["args"], ckpt["env"]
    if e.get("env") != "building":
        envs.fail(f"--behaviour-checkpoint: '{path}' was trained on --env {e.get('env')}; GroupDR needs a building policy")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{ckpt['algo']}.py")
    try:
        if not os.path.isfile(script):
            raise ValueError(f"it names algorithm '{ckpt['algo']}', which has no script algos/{ckpt['algo']}.py")
        spec = importlib.util.spec_from_file_location(f"behaviour_{ckpt['algo']}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        net = module.QNetworks(e["n_agents"], e["obs_dim"], e["n_actions"], a["hidden_dim"], a["share_params"])
        evaluation.load_q_network(net, ckpt)
    except (ValueError, RuntimeError, KeyError) as err:
        envs.fail(f"--behaviour-checkpoint: '{path}' does not match its network: {str(err).splitlines()[0]}")
    if ckpt["algo"] != "robust_vdn_rho":
        print(f"warning: the behaviour policy is {ckpt['algo']}; the paper uses a VDN-trained one", file=sys.stderr)
    return module, net.to(device).eval(), e, a


@torch.no_grad()
def collect(module, q_network, tasks, days, window, epsilon, episode_steps, rng, device="cpu"):
    """Run len(days) episodes of one config with the epsilon-greedy behaviour policy, len(tasks) at a
    time in lockstep (one batched greedy pass per step). Each agent flips its own epsilon coin
    (Alg. 2 l.8; the released code flips one for all). Every transition is kept, the last one of the
    day included (the released code drops it). -> dict of arrays state, actions, t, reward, returns."""
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
        history = module.History(len(lanes), window, N, obs_dim)
        history.reset(obs)
        returns, done = np.zeros(len(lanes)), np.zeros(len(lanes), dtype=bool)
        for t in range(limit):
            q = q_network.greedy_q(*history.tensors(device))
            greedy = module.masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
            random_actions = np.argmax(rng.random((len(lanes), N, A)) * avail, axis=-1)  # uniform over available
            actions = np.where(rng.random((len(lanes), N)) < epsilon, random_actions, greedy)
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


# ---------------------------------------------------------------------------------------------
# Fitting: head k regresses env k's rewards (MSE on standardised rewards)
# ---------------------------------------------------------------------------------------------
def fit_estimator(estimator, data, steps, batch_size, learning_rate, val_fraction, rng, device="cpu",
                  writer=None, log_every=0):
    """data: one dict per head k (keys state, actions, t, reward). Every step draws batch_size
    transitions from each environment and minimises the mean over k of head k's MSE on its own
    environment's batch. -> per-head train/val MSE in env reward units, and min-head shares."""
    tensors, splits = [], []
    for d in data:
        n = len(d["reward"])
        perm = rng.permutation(n)
        n_val = int(round(val_fraction * n)) if n > 1 else 0
        splits.append((perm[n_val:], perm[:n_val]))
        tensors.append({k: torch.from_numpy(np.asarray(d[k])).to(device) for k in ("state", "actions", "t", "reward")})
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
            pred = estimator.standardised(tb["state"][idx], tb["actions"][idx], tb["t"][idx])[:, k]
            target = (tb["reward"][idx] - estimator.reward_mean) / estimator.reward_std
            loss = loss + F.mse_loss(pred, target)
        loss = loss / len(tensors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if writer is not None and (step % 100 == 0 or step + 1 == steps):
            writer.add_scalar("losses/estimator_loss", loss.item(), step)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"fit step {step + 1}/{steps} | standardised MSE {loss.item():.4f} "
                  f"| steps/s {(step + 1) / (time.time() - start):.0f}", flush=True)
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
        "train_mse": [mse(k, tr) for k, (tr, _) in enumerate(splits)],
        "val_mse": [mse(k, va) for k, (_, va) in enumerate(splits)],
        "reward_var": [float(np.var(d["reward"])) for d in data],
        "min_head_share": min_share.tolist(),
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    configs = parse_configs(args.configs, args.allow_env6)
    day_lo, day_hi = parse_days(args.train_days)
    run_name = args.run_name or f"building__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    writer = SummaryWriter(run_dir)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # Seeding: python, numpy, torch, days, exploration and minibatches from one --seed
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-fill of every torch.empty (~1 ms a step)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    # Behaviour policy: a VDN-trained checkpoint (paper F.2)
    module, behaviour, b_env, b_args = load_behaviour(args.behaviour_checkpoint, device)

    # Data collection on every training environment (env_6 never, unless --allow-env6)
    data, global_step, start_time = [], 0, time.time()
    dims = None
    for k, config in enumerate(configs):
        n_lanes = min(args.parallel_envs, args.episodes_per_config)
        tasks = [envs.make_env("building", config) for _ in range(n_lanes)]
        task = tasks[0]
        dims = (task.n_agents, task.n_actions, task.state_dim)
        if (b_env["n_agents"], b_env["n_actions"], b_env["obs_dim"]) != (task.n_agents, task.n_actions, task.obs_dim):
            envs.fail(f"--behaviour-checkpoint: its network has n_agents {b_env['n_agents']}, n_actions "
                      f"{b_env['n_actions']}, obs_dim {b_env['obs_dim']}; {config} has {task.n_agents}, "
                      f"{task.n_actions}, {task.obs_dim}")
        days = rng.integers(day_lo, day_hi, args.episodes_per_config).tolist()
        d = collect(module, behaviour, tasks, days, b_args["window"], args.behaviour_epsilon, args.episode_steps,
                    rng, device)
        for ret in d["returns"]:
            global_step += len(d["reward"]) // len(d["returns"])
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/normalised_return", envs.normalised_return(ret), global_step)
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
        print(f"collected {config}: {len(d['returns'])} episodes, {len(d['reward'])} transitions | return "
              f"{d['returns'].mean():.1f} | reward mean {d['reward'].mean():.2f} std {d['reward'].std():.2f}", flush=True)
        data.append(d)
    time_norm = float(task.episode_limit)  # 288: t / 288 in [0, 1) for every step of a day

    # Fit r_hat_k on env k's data (shared trunk, one head per environment)
    estimator = RewardEstimator(dims[2], dims[0], dims[1], len(configs), args.hidden_dim, time_norm).to(device)
    fit = fit_estimator(estimator, data, args.fit_steps, args.fit_batch_size, args.fit_learning_rate,
                        args.val_fraction, rng, device, writer, args.log_every)
    for k, config in enumerate(configs):
        writer.add_scalar(f"losses/val_mse_{config}", fit["val_mse"][k], args.fit_steps)
        print(f"{config}: train MSE {fit['train_mse'][k]:.3f} | val MSE {fit['val_mse'][k]:.3f} | reward variance "
              f"{fit['reward_var'][k]:.3f} | min head on {100 * fit['min_head_share'][k]:.1f}% of transitions")

    # Estimator checkpoint, written atomically
    path = os.path.join(run_dir, "estimator.pt")
    checkpoint = {
        "format": ESTIMATOR_FORMAT,
        "algo": os.path.basename(__file__)[: -len(".py")],
        "args": vars(args),
        "configs": configs,  # head k = configs[k]
        "n_agents": dims[0], "n_actions": dims[1], "state_dim": dims[2],
        "hidden_dim": args.hidden_dim,
        "time_norm": time_norm,
        "normalisation": {"time": f"t / {time_norm:g}", "state_mean": estimator.state_mean.tolist(),
                          "state_std": estimator.state_std.tolist(), "reward_mean": estimator.reward_mean.item(),
                          "reward_std": estimator.reward_std.item()},
        "behaviour": {"checkpoint": os.path.abspath(args.behaviour_checkpoint), "algo": module.__name__[len("behaviour_"):],
                      "rho": b_args.get("rho"), "epsilon": args.behaviour_epsilon},
        "fit": fit,
        "estimator": estimator.state_dict(),
    }
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"estimator saved to {path}")
    writer.close()
