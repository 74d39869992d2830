"""Training throughput of the algos/ scripts at paper settings (building env_1, batch 64,
6 agents, window 8, one gradient step every 2 env steps).

    python benchmarks/throughput.py                      # every script, 1 torch thread
    python benchmarks/throughput.py --threads 2 --scripts robust_vdn_rho

For each script it runs a short training job in a subprocess (`--log-every 1`), `--repeats` times,
and reads the per-episode progress lines: env steps/s (SPS) and gradient steps/s; the mean wall time
of one gradient step (sampling, target, forward, backward, optimiser) is clocked in that subprocess
from the replay buffer's sample() to the last optimiser step after it (CHILD). Episode 1 (no updates
before `learning_starts`, cold target cache) is dropped; the rest is the steady stretch. The
table shows the median run; every run's env steps/s is listed too (this VM varies by ~5%).

In the same run it measures the floor: the bare forward + backward of the same agent network
(per-agent DRQNs or --share-params) on one batch of 64 windows, and prints the ratio
gradient step / floor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ["robust_vdn_rho", "robust_vdn_tv", "robust_qmix_rho", "robust_qmix_tv", "robust_qtran_rho", "robust_qtran_tv"]
LINE = re.compile(r"episode (\d+)/\d+ .*\| SPS (\d+) \| updates/s ([\d.]+) ")
UPDATE_LINE = re.compile(r"^bench: episode (\d+) update_s ([\d.]+) n (\d+)$", re.MULTILINE)

# The training script run as __main__ (python -c CHILD ROOT script flags...), its gradient steps clocked with
# no change to it: each update block starts at rb.sample (runs.Run.track hands over the buffer) and ends at
# the last optimiser step after it (torch's global step hook); one "bench:" line per episode (runs.Run.episode_end).
CHILD = r"""
import runpy, sys, time
sys.path.insert(0, sys.argv[1])
import runs
from torch.optim.optimizer import register_optimizer_step_post_hook

clock = {"start": None, "end": None, "seconds": 0.0, "n": 0}


def close():
    if clock["start"] is not None and clock["end"] is not None and clock["end"] > clock["start"]:
        clock["seconds"] += clock["end"] - clock["start"]
        clock["n"] += 1
    clock["start"] = clock["end"] = None


register_optimizer_step_post_hook(lambda *a: clock.update(end=time.perf_counter()))
track, episode_end = runs.Run.track, runs.Run.episode_end


def tracking(self, **state):
    if "rb" in state:
        sample = state["rb"].sample

        def timed_sample(*a, **k):
            close()
            clock["start"] = time.perf_counter()
            return sample(*a, **k)

        state["rb"].sample = timed_sample
    return track(self, **state)


def ending(self, episode, *a, **k):
    close()
    print(f"bench: episode {episode} update_s {clock['seconds']:.6f} n {clock['n']}", flush=True)
    clock["seconds"], clock["n"] = 0.0, 0
    return episode_end(self, episode, *a, **k)


runs.Run.track, runs.Run.episode_end = tracking, ending
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: list(ALL))
    """scripts under algos/ to measure (missing ones are skipped)"""
    threads: int = 1
    """torch intra-op threads for training and for the floor"""
    episodes: int = 8
    """training episodes per run (the first is dropped; 7 x 288 steady env steps)"""
    repeats: int = 3
    """runs per script; the table shows the median run (by env steps/s): this VM is noisy (+-5%)"""
    share_params_too: bool = True
    """also measure robust_vdn_rho with --share-params"""
    out: str = ""
    """optional JSON file for the results"""


def load(script: str):
    spec = importlib.util.spec_from_file_location(f"bench_{script}", os.path.join(ROOT, "algos", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def floor_ms(module, share_params: bool, reps: int = 30) -> float:
    """Median time of the agent network's forward + backward on one batch (B=64, W=8, N=6)."""
    torch.manual_seed(0)
    N, O, A, B, W = 6, 5, 200, 64, 8
    net = module.QNetworks(N, O, A, 64, share_params)
    obs = torch.randn(W, B, N, O)
    prev = torch.randint(0, A, (W, B, N))
    taken = torch.randint(0, A, (B, N, 1))
    times = []
    for k in range(reps + 5):
        start = time.perf_counter()
        q = net(obs, prev)
        q.gather(-1, taken).sum().backward()
        if k >= 5:
            times.append(time.perf_counter() - start)
        net.zero_grad()
    return 1000 * float(np.median(times))


def run_script(script: str, extra: list[str], threads: int, episodes: int) -> dict:
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            ROOT,
            os.path.join(ROOT, "algos", f"{script}.py"),
            "--torch-threads",
            str(threads),
            "--total-episodes",
            str(episodes),
            "--log-every",
            "1",
            "--run-name",
            "bench",
            "--seed",
            "1",
            *extra,
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} failed: {out.stderr.strip().splitlines()[-1:]}")
    rows = [tuple(float(x) for x in m.groups()) for m in LINE.finditer(out.stdout)]
    updates = {int(e): 1000 * float(sec) / max(int(n), 1) for e, sec, n in UPDATE_LINE.findall(out.stdout)}
    steady = [r for r in rows if r[0] > 1]
    return {
        "env_steps_per_s": float(np.mean([r[1] for r in steady])),
        "grad_steps_per_s": float(np.mean([r[2] for r in steady])),
        "grad_step_ms": float(np.mean([updates[int(r[0])] for r in steady])),
    }


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    jobs = [(s, []) for s in args.scripts if os.path.isfile(os.path.join(ROOT, "algos", f"{s}.py"))]
    if args.share_params_too and "robust_vdn_rho" in args.scripts:
        jobs.insert(1, ("robust_vdn_rho", ["--share-params"]))
    results = []
    print(
        f"torch threads: {args.threads}; {args.episodes - 1} steady episodes of 288 env steps per run; "
        f"median of {args.repeats} runs"
    )
    print(
        f"{'script':<34} {'env steps/s':>11} {'grad steps/s':>12} {'grad step ms':>12} {'floor ms':>9} {'ratio':>6}"
        f"  all runs (env steps/s)"
    )
    for script, extra in jobs:
        runs = sorted(
            (run_script(script, extra, args.threads, args.episodes) for _ in range(args.repeats)),
            key=lambda r: r["env_steps_per_s"],
        )
        res = dict(runs[len(runs) // 2], all_env_steps_per_s=[round(r["env_steps_per_s"], 1) for r in runs])
        res["floor_ms"] = floor_ms(load(script), share_params="--share-params" in extra)
        res["ratio"] = res["grad_step_ms"] / res["floor_ms"]
        name = script + (" --share-params" if extra else "")
        res["script"], res["threads"] = name, args.threads
        results.append(res)
        print(
            f"{name:<34} {res['env_steps_per_s']:>11.0f} {res['grad_steps_per_s']:>12.1f} "
            f"{res['grad_step_ms']:>12.2f} {res['floor_ms']:>9.2f} {res['ratio']:>6.2f}  {res['all_env_steps_per_s']}",
            flush=True,
        )
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
