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
on standardised inputs and rewards), in algos/groupdr_offline.py. The groups, both estimator networks and
the estimator.pt format (shared with stage 2) are in algos/groupdr_reward.py. Docs: docs/groupdr.md.

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

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import groupdr_offline  # --fit offline (collect, then fit)
import groupdr_reward as gdr  # the groups, the estimator networks r_hat_k and estimator.pt (shared with stage 2)

import envs  # the tasks (building, StarCraft, matrix games) and the agents' acting window (History)
import eval as evaluation  # a saved model's own network class (load_algo_module), as eval.py loads it
import runs  # run plumbing: flags, run folder, checkpoint / resume, Ctrl-C, NaN guard, progress, logging

BEHAVIOUR_COMMAND = "python algos/groupdr_vdn.py --observed-reward --single-coin --save-model --run-name groupdr_behaviour"


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
    configs: str = gdr.TRAIN_CONFIGS
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
    gdr.check_groups(args.configs, args.allow_env6, args.train_days)
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


if __name__ == "__main__":
    args = runs.parse_args(Args, __file__, check_args)  # one error line per bad flag
    configs = gdr.parse_configs(args.configs, args.allow_env6)
    day_lo, day_hi = gdr.parse_days(args.train_days)
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
    hidden_dim = args.hidden_dim or gdr.ARCHITECTURES[args.architecture]
    estimator = gdr.make_estimator(
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
        fit = groupdr_offline.fit_offline(
            args, estimator, (module, behaviour), b_args["window"], lanes, configs, (day_lo, day_hi), rng, device, writer
        )

    # Estimator checkpoint, written atomically (read by stage 2 with weights_only=True)
    path = os.path.join(run_dir, "estimator.pt")
    gdr.save_estimator(path, estimator, args, configs, task, b_ckpt, fit)
    print(f"estimator saved to {path}")
    writer.close()
