"""Evaluate trained agents with the paper's protocol (Section 5.1, Appendix F.2).

    python eval.py --checkpoints runs/*/model.pt --protocol paper-tables
    python eval.py --authors-dir path/to/released/run --protocol climate
    python eval.py --authors-dir results_seeds_*/robust_qmix_rho_0.012_*/network_parameter   # one dir per seed

Decentralised greedy execution needs only the agents' Q-networks: each agent acts on its own
history window, greedy over its available actions. All evaluation days of one config run as one
batch of environments stepped in lockstep, with one batched network pass per step.

Protocols (building task; days are day-of-year, see envs.py):
  paper-tables    env_1 and env_6 on the 50 days default_rng(11).integers(0, 200, 50): the days
                  behind the published Tables 1 (env_1) and 2 (env_6).
  climate         env_1..env_6 on those days (Figure 2); also writes a PNG plot.
  season          env_1 on 50 days default_rng(11).integers(200, 365, 50): the part of the year
                  never seen in training (our realisation of the seasonal shift; the paper's
                  "days 400-600" of a one-year weather file are not new days, see docs/index.md).
  climate-season  env_6 on those season days.
  custom          --configs and --days a:b (every day in [a, b)).

StarCraft (paper Sec. 5.2; docs/starcraft.md):
  starcraft         each checkpoint's win rate over --episodes greedy episodes, clean and with
                    N(0, sigma^2) on every enemy's relative position (test-time shift).
  starcraft-curves  from --runs (run folders whose scripts logged eval.jsonl during training):
                    win rate against env steps (Figure 3) and the final noisy win rate's gain
                    over rho = 0 against rho (Figure 4), as PNGs next to --out.

Normalised return per episode = (R + 9000) / 9000 (Eq. 33). One checkpoint per training seed;
checkpoints of the same method (algo, rho, ...) are grouped and reported as mean +- population
std / sqrt(n) over seeds of each seed's mean over days, as in the paper.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

import envs
import runs
from runs import write_json_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILDING_PROTOCOLS = ("paper-tables", "climate", "season", "climate-season", "custom")
PROTOCOLS = BUILDING_PROTOCOLS + ("starcraft", "starcraft-curves")
PAPER_DAYS_SEED = 11
EVAL_FIRST_DAY = 1_000_000_000  # StarCraft evaluation episode ids (training uses 0, 1, 2, ...)


@dataclass
class Args:
    checkpoints: list[str] = field(default_factory=list)
    """model.pt files written by algos/*.py --save-model (one per training seed)"""
    authors_dir: list[str] = field(default_factory=list)
    """directories of the authors' released per-agent checkpoints agent_{i}_q_network.pt (one per seed; same run name = same method)"""
    protocol: str = "paper-tables"
    """paper-tables, climate, season, climate-season, custom, starcraft or starcraft-curves"""
    runs: list[str] = field(default_factory=list)
    """starcraft-curves: run folders (runs/<run name>) holding eval.jsonl"""
    episodes: int = 32
    """starcraft: greedy episodes per evaluation (paper: 32)"""
    sigma: float = 0.75
    """starcraft: std of the test-time noise on enemy positions (paper: 0.75)"""
    configs: str = ""
    """custom protocol: comma-separated building configs (e.g. env_1,env_6)"""
    days: str = ""
    """custom protocol: day range a:b (every day-of-year in [a, b))"""
    episode_steps: int = 0
    """cap on steps per episode (0 = the env's own limit)"""
    out: str = "results/eval.json"
    """JSON file with every episode's return (written atomically); the PNG goes next to it"""
    device: str = "cpu"
    """torch device"""
    torch_threads: int = 1
    """torch intra-op threads"""


def protocol_plan(args: Args) -> tuple[list[str], list[int]]:
    """(configs, days) of a protocol."""
    train_days = np.random.default_rng(PAPER_DAYS_SEED).integers(0, 200, 50).tolist()
    season_days = np.random.default_rng(PAPER_DAYS_SEED).integers(200, 365, 50).tolist()
    if args.protocol == "paper-tables":
        return ["env_1", "env_6"], train_days
    if args.protocol == "climate":
        return list(envs.BUILDING_CONFIGS), train_days
    if args.protocol == "season":
        return ["env_1"], season_days
    if args.protocol == "climate-season":
        return ["env_6"], season_days
    configs = [c for c in args.configs.split(",") if c]
    lo, _, hi = args.days.partition(":")
    if not configs:
        envs.fail("--configs is required with --protocol custom (e.g. --configs env_1,env_6)")
    for c in configs:
        if c not in envs.BUILDING_CONFIGS:
            envs.fail(f"--configs '{c}' is unknown; accepted: {', '.join(envs.BUILDING_CONFIGS)}")
    if not (lo.isdigit() and hi.isdigit() and int(lo) < int(hi)):
        envs.fail(f"--days must look like a:b with integers a < b (got '{args.days}')")
    return configs, list(range(int(lo), int(hi)))


def load_algo_module(algo: str):
    """The training script itself (algos/<algo>.py): eval uses its very network class."""
    path = os.path.join(ROOT, "algos", f"{algo}.py")
    if not os.path.isfile(path):
        raise ValueError(f"it names algorithm '{algo}', which has no script algos/{algo}.py")
    spec = importlib.util.spec_from_file_location(f"algos_{algo}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def agent_state_dict(drqn, k: int) -> dict:
    """Network k of a script's DRQN (parameters stacked over the networks) in the released per-agent format
    (agent_{k}_q_network.pt): the same names, fc1's obs and one-hot columns joined into one fc1.weight."""
    state = {key: value[k] for key, value in drqn.state_dict().items()}
    state["fc1.weight"] = torch.cat([state.pop("fc1.weight_obs"), state.pop("fc1.weight_onehot").t()], 1)
    return {key: value.detach().clone() for key, value in state.items()}


@torch.no_grad()
def load_agent_state_dict(drqn, k: int, state: dict) -> None:
    """A released per-agent state dict into network k of a script's DRQN (every key and shape checked first)."""
    for key, value in agent_state_dict(drqn, k).items():
        if key not in state or state[key].shape != value.shape:
            raise RuntimeError(
                f"{key}: expected shape {tuple(value.shape)}, got {tuple(state[key].shape) if key in state else 'nothing'}"
            )
    obs_dim = drqn.fc1.weight_obs.shape[-1]
    own = {
        **state,
        "fc1.weight_obs": state["fc1.weight"][:, :obs_dim],
        "fc1.weight_onehot": state["fc1.weight"][:, obs_dim:].t(),
    }
    for key, param in drqn.state_dict(keep_vars=True).items():
        param[k].copy_(own[key])


def load_q_network(net, ckpt: dict) -> None:
    """A model.pt's weights (runs.load_model's dict) into net. v3 / v2: each DRQN parameter stacked over the agents.
    v1 (written before 2026-11-21): one module per agent (agents.{k}.fc1.weight, ...), loaded agent by agent
    through the released per-agent format. Raises RuntimeError / KeyError on any mismatch."""
    state = ckpt["q_network"]
    if ckpt["format"] != "drigm-checkpoint-v1":
        net.load_state_dict(state)
        return
    n_nets = net.drqn.fc1.bias.shape[0]
    if {key.split(".")[1] for key in state if key.startswith("agents.")} != {str(k) for k in range(n_nets)}:
        raise RuntimeError(f"expected agents.0 .. agents.{n_nets - 1} in a v1 checkpoint")
    for k in range(n_nets):
        prefix = f"agents.{k}."
        load_agent_state_dict(net.drqn, k, {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)})


def load_checkpoint(path: str, device):
    """-> (label, module, q_network, env_info, args dict). One error line for any bad file; the file is read with
    torch.load(weights_only=True) (runs.load_model), so a downloaded checkpoint cannot run code."""
    ckpt = runs.load_model(path, "--checkpoints", device)
    a, e = ckpt["args"], ckpt["env"]
    try:
        module = load_algo_module(ckpt["algo"])
        net = module.QNetworks(e["n_agents"], e["obs_dim"], e["n_actions"], a["hidden_dim"], a["share_params"])
        load_q_network(net, ckpt)
    except (ValueError, RuntimeError, KeyError) as err:
        envs.fail(f"--checkpoints: '{path}' does not match its network: {str(err).splitlines()[0]}")
    label = ckpt["algo"] + (f" rho={a['rho']}" if "rho" in a else "")  # GroupDR has no rho
    label += f" {a['worst_value']}" if a.get("worst_value", "zero") != "zero" else ""
    return label, module, net.to(device).eval(), e, a


def authors_label(path: str) -> str:
    """The method of a released run directory, shared by its seeds: results_seeds_<k>/robust_qmix_rho_0.012_<date>_<time>
    [/network_parameter] -> "authors: robust_qmix_rho_0.012" (the date and time of the run dropped)."""
    parts = os.path.normpath(path).split(os.sep)
    name = parts[-2] if parts[-1] == "network_parameter" and len(parts) > 1 else parts[-1]
    return "authors: " + re.sub(r"_\d{8}_\d{6}$", "", name)


def load_authors_dir(path: str, device):
    """The released per-agent checkpoints agent_{i}_q_network.pt (keys fc1.*, lstm.*, fc_out.*)
    loaded into our per-agent network (robust_vdn_rho's QNetworks; all six scripts share it)."""
    files = (
        sorted(f for f in os.listdir(path) if f.startswith("agent_") and f.endswith("_q_network.pt"))
        if os.path.isdir(path)
        else []
    )
    if not files:
        envs.fail(f"--authors-dir: '{path}' holds no agent_{{i}}_q_network.pt files")
    module = load_algo_module("robust_vdn_rho")
    n = len(files)
    net = module.QNetworks(n, 5, 200, 64, share_params=False)
    for i in range(n):
        f = os.path.join(path, f"agent_{i}_q_network.pt")
        try:
            state = torch.load(f, map_location=device, weights_only=True)
            load_agent_state_dict(net.drqn, i, state)
        except FileNotFoundError:
            envs.fail(f"--authors-dir: missing agent_{i}_q_network.pt in '{path}' (found {n} agent files)")
        except Exception as e:  # noqa: BLE001
            envs.fail(f"--authors-dir: '{f}' is not a released agent state dict: {str(e).splitlines()[0]}")
    env = {"env": "building", "config": "env_1", "n_agents": n, "obs_dim": 5, "n_actions": 200}
    return authors_label(path), module, net.to(device).eval(), env, {"window": 8}


@torch.no_grad()
def run_episodes(module, q_network, env_id: str, config: str, days: list[int], window: int, episode_steps=0, device="cpu"):
    """Greedy decentralised execution on len(days) episodes at once -> team returns (E,)."""
    tasks = [envs.make_env(env_id, config) for _ in days]
    first = [task.reset(day) for task, day in zip(tasks, days)]
    obs = np.stack([f[0] for f in first])
    avail = np.stack([f[2] for f in first])
    E, N = len(days), tasks[0].n_agents
    history = envs.History(E, window, N, tasks[0].obs_dim)
    history.reset(obs)
    returns, done = np.zeros(E), np.zeros(E, dtype=bool)
    limit = min(episode_steps or tasks[0].episode_limit, tasks[0].episode_limit)
    for _ in range(limit):
        q = q_network.greedy_q(*history.tensors(device))
        actions = module.masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
        for e in np.flatnonzero(~done):
            o, _, av, r, term, trunc, _ = tasks[e].step(actions[e])
            obs[e], avail[e] = o, av
            returns[e] += r
            done[e] = term or trunc
        history.push(obs, actions)
        if done.all():
            break
    return returns


@torch.no_grad()
def run_episode(module, q_network, task, day: int, window: int, device="cpu"):
    """One greedy episode on one task (StarCraft: episodes end at different times, and a real
    SMAC env is one game process) -> (team return, battle won)."""
    obs, _, avail = task.reset(day)
    history = envs.History(1, window, task.n_agents, task.obs_dim)
    history.reset(obs[None])
    total, won = 0.0, False
    for _ in range(task.episode_limit):
        q = q_network.greedy_q(*history.tensors(device))[0]
        actions = module.masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
        obs, _, avail, reward, terminated, truncated, info = task.step(actions)
        total += reward
        won = bool(info.get("battle_won", False))
        history.push(obs[None], actions[None])
        if terminated or truncated:
            break
    return total, won


def lockstep_q(q_network, n_rows: int):
    """-> q(obs_w (W, E, N, obs), prev_a_w (W, E, N)) -> Q (E, N, A) for E <= n_rows episodes in one call, equal
    bit for bit to E calls of q_network.greedy_q on one episode each (what run_episode and training's acting do).

    One call on E episodes would take other matrix kernels than E calls on one (fused.py's LSTM takes plain dot
    products for <= 2 rows, BLAS above) and differ in the last bits, which can flip a greedy action. So the N
    per-agent DRQNs are repeated E times: E * N networks of one row each, the same kernels on the same numbers
    (torch.func.functional_call with the first E * N copies, no new module, no RNG drawn). Shared-parameter
    networks (one DRQN, N rows per episode) are called episode by episode instead."""
    drqn = getattr(q_network, "drqn", None)
    n_agents = getattr(q_network, "n_agents", 0)
    names = dict(drqn.named_parameters()) if drqn is not None else {}
    stacked = bool(names) and all(p.shape[0] == n_agents for p in names.values()) and hasattr(drqn, "fc1")
    if getattr(q_network, "share_params", True) or not stacked:

        def per_episode(obs_w, prev_a_w):
            return torch.cat(
                [
                    q_network.greedy_q(obs_w[:, e : e + 1].contiguous(), prev_a_w[:, e : e + 1].contiguous())
                    for e in range(obs_w.shape[1])
                ]
            )

        return per_episode
    wide = {f"drqn.{k}": p.detach().repeat(n_rows, *[1] * (p.dim() - 1)) for k, p in names.items()}
    stride = drqn.fc1.weight_onehot.shape[1]  # one-hot rows of one network's table
    wide["drqn.fc1.rows"] = stride * torch.arange(n_rows * n_agents, device=drqn.fc1.rows.device).unsqueeze(1)

    @torch.no_grad()
    def q(obs_w, prev_a_w):
        W, E, N = prev_a_w.shape
        sliced = {k: v[: E * N] for k, v in wide.items()}  # the first E * N copies (views)
        out = torch.func.functional_call(q_network, sliced, (obs_w.reshape(W, 1, E * N, -1), prev_a_w.reshape(W, 1, E * N)))
        return out.view(E, N, -1)

    return q


@torch.no_grad()
def run_episodes_lockstep(module, q_network, task, days, noise, window: int, device="cpu"):
    """run_episode on every (days[e], noise[e]) at once -> (team returns (E,), battle won (E,)), the same numbers:
    one DRQN call per step for the live episodes (lockstep_q), the task stepped as a batch (task.reset_batch /
    step_batch: SMAX's vmapped step), finished episodes masked. noise[e]: None (clean) or an ObservationNoise
    whose noise for episode days[e] is drawn exactly as its reset(days[e]) and step() would draw it."""
    days = [int(d) for d in days]
    E = len(days)
    obs, _, avail = task.reset_batch(days)
    for e, wrap in enumerate(noise):
        if wrap is not None:
            wrap.rng = np.random.default_rng((wrap.seed, days[e]))  # as ObservationNoise.reset(day)
            obs[e] = wrap.perturb(obs[e])
    history = envs.History(E, window, task.n_agents, task.obs_dim)
    history.reset(obs)
    q_fn = lockstep_q(q_network, E)
    returns, won, live = np.zeros(E), np.zeros(E, dtype=bool), np.ones(E, dtype=bool)
    actions = np.full((E, task.n_agents), task.noop_action, dtype=np.int64)
    for _ in range(task.episode_limit):
        rows = np.flatnonzero(live)
        obs_w, prev_w = history.tensors(device)
        index = torch.from_numpy(rows).to(device)
        q = q_fn(obs_w.index_select(1, index), prev_w.index_select(1, index))
        actions[:] = task.noop_action
        actions[rows] = module.masked_argmax(q, torch.from_numpy(avail[rows]).to(device)).cpu().numpy()
        obs, _, step_avail, reward, terminated, truncated, battle_won = task.step_batch(actions, live)
        for e in rows:
            if noise[e] is not None:
                obs[e] = noise[e].perturb(obs[e])
            returns[e] += float(reward[e])
            won[e] = bool(battle_won[e])
        avail[rows] = step_avail[rows]
        history.push(obs, actions)
        live &= ~(terminated | truncated)
        if not live.any():
            break
    return returns, won


def evaluate_starcraft(
    module,
    q_network,
    task,
    n_episodes=32,
    sigma=0.75,
    noise_seed=0,
    window=8,
    device="cpu",
    first_day=EVAL_FIRST_DAY,
    lockstep=None,
):
    """Paper Sec. 5.2: n_episodes greedy episodes with clean observations and the same episodes
    with N(0, sigma^2) on every enemy's relative position (test-time shift only). Episode ids
    start at first_day, far from the ids training episodes use.

    lockstep (default: whenever the task can step a batch, i.e. SMAX): all 2 * n_episodes episodes at once
    (run_episodes_lockstep), the same episodes and numbers as the sequential loop (run_episode one episode
    after the other), which SMAC (one game process) keeps."""
    result = {}
    days = list(range(first_day, first_day + n_episodes))
    if lockstep is None:  # the class's own method (a wrapper's __getattr__ would hand out the unwrapped task's)
        lockstep = callable(getattr(type(task), "reset_batch", None))
    if lockstep:
        wraps = [None] * n_episodes + [envs.ObservationNoise(task, sigma=sigma, seed=noise_seed) for _ in days]
        returns, won = run_episodes_lockstep(module, q_network, task, days + days, wraps, window, device)
        runs = {
            "clean": list(zip(returns[:n_episodes], won[:n_episodes])),
            "noisy": list(zip(returns[n_episodes:], won[n_episodes:])),
        }
    else:
        noisy = envs.ObservationNoise(task, sigma=sigma, seed=noise_seed)
        runs = {
            name: [run_episode(module, q_network, env, day, window, device) for day in days]
            for name, env in (("clean", task), ("noisy", noisy))
        }
    for name in ("clean", "noisy"):
        result[f"win_rate_{name}"] = float(np.mean([bool(w) for _, w in runs[name]]))
        result[f"return_{name}"] = float(np.mean([float(r) for r, _ in runs[name]]))
    return result


def starcraft_eval_round(module, q_network, task, step, run, device="cpu") -> None:
    """Training-time evaluation of the algos/ scripts (Sec. 5.2) at env step `step` of `run` (a runs.Run): clean and
    noisy win rates to TensorBoard (eval/*), to runs/<run>/eval.jsonl (for --protocol starcraft-curves) and stdout."""
    a = run.args
    result = evaluate_starcraft(module, q_network, task, a.eval_episodes, a.eval_sigma, a.seed, a.window, device)
    for key, value in result.items():
        run.writer.add_scalar(f"eval/{key}", value, step)
    append_jsonl(os.path.join(run.run_dir, "eval.jsonl"), {"step": step, **result})
    print(
        f"eval at {step} steps | win rate clean {result['win_rate_clean']:.3f} | noisy {result['win_rate_noisy']:.3f}",
        flush=True,
    )


def append_jsonl(path: str, record: dict) -> None:
    """One evaluation point per line (runs/<run>/eval.jsonl), flushed as it is written."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def summarise(per_seed: list[float]) -> tuple[float, float]:
    """Mean over seeds +- population std / sqrt(n) (the paper's error bars)."""
    x = np.asarray(per_seed, dtype=float)
    return float(x.mean()), float(x.std() / np.sqrt(len(x)))


def plot_climate(table: dict, configs: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in table.items():
        means = [rows[c][0] for c in configs]
        errs = [rows[c][1] for c in configs]
        ax.errorbar(configs, means, yerr=errs, marker="o", capsize=3, label=label)
    ax.set_ylabel("normalised return (Eq. 33)")
    ax.set_title("Climatic shift: trained on env_1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def main(args: Args) -> dict:
    if args.protocol not in PROTOCOLS:
        envs.fail(f"--protocol '{args.protocol}' is unknown; accepted: {', '.join(PROTOCOLS)}")
    if args.protocol == "starcraft-curves":
        return starcraft_curves(args)
    if args.protocol == "starcraft":
        return starcraft_table(args)
    if not args.checkpoints and not args.authors_dir:
        envs.fail("give --checkpoints FILE [FILE ...] or --authors-dir DIR")
    configs, days = protocol_plan(args)
    torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    loaded = [load_checkpoint(p, device) for p in args.checkpoints]
    loaded += [load_authors_dir(d, device) for d in args.authors_dir]
    for (label, _, _, env_info, _), path in zip(loaded, args.checkpoints + args.authors_dir):
        if env_info["env"] != "building":
            envs.fail(f"--checkpoints: '{path}' was trained on --env {env_info['env']}; these protocols are for building")

    episodes, groups = [], {}
    for (label, module, net, env_info, a), path in zip(loaded, args.checkpoints + args.authors_dir):
        for config in configs:
            returns = run_episodes(module, net, "building", config, days, a["window"], args.episode_steps, device)
            norm = [envs.normalised_return(r) for r in returns]
            episodes.append(
                {
                    "checkpoint": path,
                    "label": label,
                    "config": config,
                    "days": days,
                    "returns": returns.tolist(),
                    "normalised": norm,
                }
            )
            groups.setdefault(label, {}).setdefault(config, []).append(float(np.mean(norm)))

    table = {label: {c: summarise(v) for c, v in rows.items()} for label, rows in groups.items()}
    width = max(len(lbl) for lbl in table)
    print(f"protocol {args.protocol}: {len(days)} days per config; mean +- SE over seeds of the normalised return")
    print(f"{'method':<{width}}  seeds  " + "  ".join(f"{c:>13}" for c in configs))
    for label, rows in table.items():
        n = len(groups[label][configs[0]])
        print(f"{label:<{width}}  {n:>5}  " + "  ".join(f"{rows[c][0]:6.3f}+-{rows[c][1]:5.3f}" for c in configs))
    payload = {
        "protocol": args.protocol,
        "configs": configs,
        "days": days,
        "table": {
            lbl: {c: {"mean": m, "se": s, "n_seeds": len(groups[lbl][c])} for c, (m, s) in rows.items()}
            for lbl, rows in table.items()
        },
        "episodes": episodes,
    }
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    if args.protocol == "climate":
        png = os.path.splitext(args.out)[0] + ".png"
        plot_climate(table, configs, png)
        print(f"wrote {png}")
    return payload


def starcraft_table(args: Args) -> dict:
    if not args.checkpoints:
        envs.fail("--checkpoints is required with --protocol starcraft")
    torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    groups, rows = {}, []
    for path in args.checkpoints:
        label, module, net, env_info, a = load_checkpoint(path, device)
        if env_info["env"] not in envs.STARCRAFT_ENV_IDS:
            envs.fail(
                f"--checkpoints: '{path}' was trained on --env {env_info['env']}; --protocol starcraft needs smax or smac"
            )
        try:
            task = envs.make_env(env_info["env"], env_info["config"], seed=10_000 + int(a.get("seed", 0)))
        except envs.EnvArgError as e:
            envs.fail(str(e))
        label = f"{getattr(task, 'label', env_info['env'])} | {label}"
        res = evaluate_starcraft(module, net, task, args.episodes, args.sigma, int(a.get("seed", 0)), a["window"], device)
        rows.append({"checkpoint": path, "label": label, **res})
        groups.setdefault(label, []).append(res)
    print(f"{args.episodes} greedy episodes per checkpoint; noise sigma {args.sigma}; mean +- SE over seeds")
    table = {}
    for label, results in groups.items():
        table[label] = {k: summarise([r[k] for r in results]) for k in ("win_rate_clean", "win_rate_noisy")}
        c, n = table[label]["win_rate_clean"], table[label]["win_rate_noisy"]
        print(f"{label}  seeds {len(results)}  clean {c[0]:.3f}+-{c[1]:.3f}  noisy {n[0]:.3f}+-{n[1]:.3f}")
    payload = {"protocol": "starcraft", "episodes": args.episodes, "sigma": args.sigma, "table": table, "checkpoints": rows}
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    return payload


def starcraft_curves(args: Args) -> dict:
    """Figures 3-4 from the eval.jsonl files that training runs write every --eval-every steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not args.runs:
        envs.fail("--runs is required with --protocol starcraft-curves (run folders holding eval.jsonl)")
    curves = {}  # (algo, rho) -> list of (steps, clean, noisy) per seed
    for run in args.runs:
        log, hp = os.path.join(run, "eval.jsonl"), os.path.join(run, "args.json")
        if not (os.path.isfile(log) and os.path.isfile(hp)):
            envs.fail(f"--runs: '{run}' has no eval.jsonl/args.json (train with --env smax or smac)")
        with open(hp) as f:
            a = json.load(f)
        with open(log) as f:
            points = [json.loads(line) for line in f if line.strip()]
        steps = np.array([p["step"] for p in points])
        curves.setdefault((a["exp_name"], float(a["rho"])), []).append(
            (steps, np.array([p["win_rate_clean"] for p in points]), np.array([p["win_rate_noisy"] for p in points]))
        )
    fig, ax = plt.subplots(figsize=(7, 4))
    final = {}
    for (algo, rho), seeds in sorted(curves.items()):
        n = min(len(s[0]) for s in seeds)
        noisy = np.stack([s[2][:n] for s in seeds])
        mean, se = noisy.mean(0), noisy.std(0) / np.sqrt(len(seeds))
        ax.plot(seeds[0][0][:n], mean, label=f"{algo} rho={rho}")
        ax.fill_between(seeds[0][0][:n], mean - se, mean + se, alpha=0.2)
        final[(algo, rho)] = noisy[:, -1]
    ax.set_xlabel("env steps")
    ax.set_ylabel("test win rate (noisy observations)")
    ax.legend(fontsize=7)
    stem = os.path.splitext(args.out)[0]
    fig.tight_layout()
    fig.savefig(stem + "_fig3.tmp.png", dpi=120)
    os.replace(stem + "_fig3.tmp.png", stem + "_fig3.png")
    plt.close(fig)
    gains = {}
    for (algo, rho), vals in final.items():
        base = final.get((algo, 0.0))
        if base is not None and rho > 0:
            gains.setdefault(algo, []).append((rho, float(vals.mean() - base.mean()), float(vals.std() / np.sqrt(len(vals)))))
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, pts in gains.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=algo)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("rho")
    ax.set_ylabel("final noisy win rate - non-robust (rho = 0)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "_fig4.tmp.png", dpi=120)
    os.replace(stem + "_fig4.tmp.png", stem + "_fig4.png")
    plt.close(fig)
    payload = {
        "protocol": "starcraft-curves",
        "final_noisy": {f"{k[0]} rho={k[1]}": v.tolist() for k, v in final.items()},
        "gain_over_rho0": {k: v for k, v in gains.items()},
    }
    write_json_atomic(args.out, payload)
    print(f"wrote {stem}_fig3.png, {stem}_fig4.png and {args.out}")
    return payload


if __name__ == "__main__":
    main(tyro.cli(Args))
