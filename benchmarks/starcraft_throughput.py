"""SMAX 3s_vs_5z training throughput of algos/robust_vdn_rho.py and robust_qmix_rho.py (issue 18, item 3).

    python benchmarks/starcraft_throughput.py                                # this checkout
    python benchmarks/starcraft_throughput.py --roots /tmp/before . --labels before after --out r.json

`git worktree add /tmp/before <commit>` gives the code to compare with. For each root and script, one short
training run in a subprocess (`--env smax --torch-threads 1 --total-steps --steps`, StarCraft defaults
otherwise, evaluation rounds every --eval-every steps) with timers around the code the run calls from
envs.py / eval.py / runs.py, which need no change to the script:

  env         envs.SMAXTask.reset / step of training episodes
  update      a gradient step (sample, targets, forward, backward, optimiser): from the replay buffer's sample()
              to the last optimiser step after it (runs.Run.track hands over the buffer; torch's global
              optimiser-step hook); code before runs.py: the script's own clock (TrainingRun.update_seconds),
              read before each progress line resets it
  eval        eval.starcraft_eval_round (2 x --eval-episodes greedy episodes); the first round of a process
              also compiles the batched SMAX step (after) and is reported apart
  checkpoint  runs.Run.save (before runs.py: eval.TrainingRun.save; checkpoint.pt: networks, optimiser, the
              50,000-transition buffer, RNG)
  acting      one acting step of the training loop (greedy_q on the 1-episode window, masked argmax, epsilon
              coins) timed on its own in the same process after the run (the loop's calls cannot be timed from
              outside), times the env steps
  other       the rest: replay add, history, TensorBoard scalars, episode bookkeeping

Reported per root and script: env steps/s of training alone (eval and checkpoints excluded), with evaluation
at --eval-every 10000 (the paper's), and the projected wall time of a 1,000,000-step run with evaluation
every 10,000 steps and the root's checkpoint schedule (before: every 50 episodes at the measured mean
episode length; after: every 10 minutes and at the end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["robust_vdn_rho", "robust_qmix_rho"]


@dataclass
class Args:
    roots: list[str] = field(default_factory=lambda: [ROOT])
    """repository checkouts to measure (e.g. a worktree of the previous commit, then this one)"""
    labels: list[str] = field(default_factory=list)
    """a name per root (default: the folder names)"""
    scripts: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """algos/ scripts"""
    steps: int = 4000
    """env steps per training run"""
    eval_every: int = 2000
    """evaluation round every this many env steps in the benchmark runs (at least 2 rounds: the first compiles)"""
    eval_episodes: int = 32
    """greedy episodes per round, clean and noisy each (paper: 32)"""
    nice: int = 0
    """niceness of the training subprocesses (negative needs root)"""
    out: str = ""
    """optional JSON file for the results"""
    child: str = ""
    """internal: run one measurement in this process (JSON of root, script, args) and print its result"""


# ------------------------------------------------ child ------------------------------------------------
def child(spec: dict) -> dict:
    import runpy

    root = spec["root"]
    sys.path.insert(0, root)
    import envs
    import eval as evaluation

    t = {"env": 0.0, "update": 0.0, "n_updates": 0, "eval_rounds": [], "checkpoints": [], "episodes": 0, "in_eval": False}

    def timed(fn, key):
        def wrapper(*a, **k):
            if t["in_eval"]:
                return fn(*a, **k)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t[key] += time.perf_counter() - start

        return wrapper

    envs.SMAXTask.step = timed(envs.SMAXTask.step, "env")
    reset = timed(envs.SMAXTask.reset, "env")

    def counted_reset(self, day):
        t["episodes"] += not t["in_eval"]
        return reset(self, day)

    envs.SMAXTask.reset = counted_reset
    eval_round = evaluation.starcraft_eval_round

    def timed_eval(*a, **k):
        t["in_eval"], start = True, time.perf_counter()
        try:
            return eval_round(*a, **k)
        finally:
            t["in_eval"] = False
            t["eval_rounds"].append(time.perf_counter() - start)

    evaluation.starcraft_eval_round = timed_eval
    run_class = getattr(evaluation, "TrainingRun", None)  # the code before runs.py
    if run_class is None:
        import runs

        run_class = runs.Run
        clock_updates(run_class, t)
    else:
        progress = run_class.progress

        def counted_progress(self, *a, **k):
            before = self.update_seconds
            out = progress(self, *a, **k)
            if self.update_seconds != before:  # a progress line was printed and the clock reset
                t["update"] += before
            return out

        run_class.progress = counted_progress
    save = run_class.save

    def timed_save(self, *a):
        start = time.perf_counter()
        save(self, *a)
        t["checkpoints"].append(time.perf_counter() - start)

    run_class.save = timed_save
    script = os.path.join(root, "algos", spec["script"] + ".py")
    sys.argv = [
        script,
        "--env",
        "smax",
        "--torch-threads",
        "1",
        "--total-steps",
        str(spec["steps"]),
        "--eval-every",
        str(spec["eval_every"]),
        "--eval-episodes",
        str(spec["eval_episodes"]),
        "--log-every",
        "10",
        "--run-name",
        "bench",
        "--seed",
        "1",
    ]
    start = time.perf_counter()
    namespace = runpy.run_path(script, run_name="__main__")
    wall = time.perf_counter() - start
    setup = namespace["run"].start[0] - (time.time() - wall)  # import, env build and compile before the first episode
    steps = namespace["global_step"]
    if "close_update" in t:
        t.pop("close_update")()
    n_updates = namespace["n_updates"] if "n_updates" in namespace else t["n_updates"]
    return {
        "root": root,
        "script": spec["script"],
        "steps": steps,
        "episodes": t["episodes"],
        "wall_s": wall,
        "setup_s": setup,
        "env_s": t["env"],
        "update_s": t["update"],
        "n_updates": n_updates,
        "eval_rounds_s": t["eval_rounds"],
        "checkpoints_s": t["checkpoints"],
        "checkpoint_every": namespace["args"].checkpoint_every,
        "acting_ms": acting_ms(namespace),
    }


def clock_updates(run_class, t: dict) -> None:
    """runs.Run's scripts keep no update clock: each gradient step runs from rb.sample (the buffer handed to
    run.track) to the last optimiser step after it; t["update"] and t["n_updates"] add them up."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    clock = {"start": None, "end": None}

    def close():
        if clock["start"] is not None and clock["end"] is not None and clock["end"] > clock["start"]:
            t["update"] += clock["end"] - clock["start"]
            t["n_updates"] += 1
        clock["start"] = clock["end"] = None

    register_optimizer_step_post_hook(lambda *a: clock.update(end=time.perf_counter()))
    track = run_class.track

    def tracking(self, **state):
        if "rb" in state:
            sample = state["rb"].sample

            def timed_sample(*a, **k):
                close()
                clock["start"] = time.perf_counter()
                return sample(*a, **k)

            state["rb"].sample = timed_sample
        return track(self, **state)

    run_class.track, t["close_update"] = tracking, close


def acting_ms(ns: dict, reps: int = 300) -> float:
    """One acting step of the training loop (the script's own objects, after its run): greedy_q on the
    1-episode window, masked argmax over the available actions, the epsilon coins and random actions."""
    import numpy as np
    import torch

    q_network, history, env, rng, device = ns["q_network"], ns["history"], ns["env"], ns["rng"], ns["device"]
    obs, _, avail = env.reset(0)
    history.reset(obs[None])
    N, A = env.n_agents, env.n_actions
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        q = q_network.greedy_q(*history.tensors(device))[0]
        greedy = ns["masked_argmax"](q, torch.from_numpy(avail).to(device)).cpu().numpy()
        random_actions = np.argmax(rng.random((N, A)) * avail, axis=1)
        coins = rng.random(N)
        np.where(coins < 0.5, random_actions, greedy)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


# ------------------------------------------------ parent -----------------------------------------------
def measure(root: str, script: str, args: Args) -> dict:
    spec = {
        "root": os.path.abspath(root),
        "script": script,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_episodes": args.eval_episodes,
    }
    with tempfile.TemporaryDirectory() as cwd:
        cmd = ["nice", "-n", str(args.nice)] if args.nice else []
        cmd += [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} in {root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(r: dict) -> dict:
    """Per env step of training (eval rounds and checkpoints excluded) and the 1M-step projection."""
    rounds, ckpts = r["eval_rounds_s"], r["checkpoints_s"]
    train = r["wall_s"] - r["setup_s"] - sum(rounds) - sum(ckpts)
    per_step = {"env": r["env_s"], "update": r["update_s"], "acting": r["acting_ms"] * r["steps"] / 1000}
    per_step["other"] = train - sum(per_step.values())
    per_step = {k: 1000 * v / r["steps"] for k, v in per_step.items()}  # ms per env step
    steady_round = min(rounds[1:]) if len(rounds) > 1 else rounds[0]
    ckpt = max(ckpts) if ckpts else 0.0  # the fullest checkpoint (the buffer arrays are allocated in full anyway)
    sps_train = r["steps"] / train
    sps_eval = 1 / (1 / sps_train + steady_round / 10_000)
    episode_len = r["steps"] / max(r["episodes"], 1)
    hours_train = 1_000_000 / sps_eval / 3600
    if r["checkpoint_every"] > 0:
        n_ckpt = 1_000_000 / (episode_len * r["checkpoint_every"])
    else:
        n_ckpt = hours_train * 6 + 1
    return {
        "sps_train": sps_train,
        "sps_with_eval": sps_eval,
        "ms_per_step": per_step,
        "eval_round_s": steady_round,
        "first_eval_round_s": rounds[0],
        "checkpoint_s": ckpt,
        "mean_episode_steps": episode_len,
        "grad_step_ms": 1000 * r["update_s"] / max(r["n_updates"], 1),
        "checkpoints_per_1M": n_ckpt,
        "hours_1M": hours_train + n_ckpt * ckpt / 3600,
    }


def main(args: Args) -> list[dict]:
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return []
    labels = args.labels or [os.path.basename(os.path.abspath(r)) for r in args.roots]
    print(
        f"SMAX 3s_vs_5z, --torch-threads 1, {args.steps} env steps per run, eval rounds of 2 x {args.eval_episodes} "
        f"episodes every {args.eval_every} steps (projections: every 10,000)"
    )
    head = (
        f"{'code':<8} {'script':<16} {'SPS train':>9} {'SPS +eval':>9} {'acting':>7} {'env':>6} {'update':>7} "
        f"{'other':>6} {'grad ms':>7} {'eval s':>7} {'ckpt s':>7} {'ckpts/1M':>8} {'1M h':>5}"
    )
    print(head)
    results = []
    for label, root in zip(labels, args.roots):
        for script in args.scripts:
            r = measure(root, script, args)
            r.update(label=label, **summarise(r))
            results.append(r)
            ms = r["ms_per_step"]
            print(
                f"{label:<8} {script:<16} {r['sps_train']:>9.0f} {r['sps_with_eval']:>9.0f} {ms['acting']:>7.2f} "
                f"{ms['env']:>6.2f} {ms['update']:>7.2f} {ms['other']:>6.2f} {r['grad_step_ms']:>7.2f} "
                f"{r['eval_round_s']:>7.2f} {r['checkpoint_s']:>7.2f} {r['checkpoints_per_1M']:>8.0f} {r['hours_1M']:>5.2f}",
                flush=True,
            )
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return results


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
