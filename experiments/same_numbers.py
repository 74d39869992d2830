"""Same numbers before and after a code change: tiny runs of every algos/ script, compared with torch.equal.

    python experiments/same_numbers.py --before /path/to/checkout/of/the/old/commit [--scripts robust_vdn_rho ...]
        [--flags '--update-schedule released']      # the same comparison with more flags on every run

For every script, task (building, matrix) and --fused / --no-fused, the same tiny run (same seed; the replay buffer
wraps and the target is copied several times) is made with the old tree and with this one. Then checkpoint.pt
(networks, targets, optimiser states, the replay buffer with its V' cache, every RNG state) and model.pt must be
equal tensor for tensor (torch.equal; arrays np.array_equal), after converting the old files to today's layout with
the very functions --resume and eval.py use (runs.upgrade_run_checkpoint, runs.rename_drqn). Also: a run of the
old tree cut after 2 episodes and resumed by this tree must end equal to this tree's uninterrupted run.
Exit 1 if anything differs. A refactor's note shows this script's output.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import runs

TASKS = {
    "building": [
        "--env",
        "building",
        "--total-episodes",
        "3",
        "--episode-steps",
        "40",
        "--learning-starts",
        "16",
        "--batch-size",
        "8",
        "--buffer-size",
        "100",
        "--target-network-frequency",
        "30",
        "--exploration-steps",
        "200",
    ],
    "matrix": [
        "--env",
        "matrix",
        "--total-episodes",
        "40",
        "--learning-starts",
        "8",
        "--batch-size",
        "8",
        "--buffer-size",
        "30",
        "--target-network-frequency",
        "20",
        "--exploration-steps",
        "40",
    ],
}
SCRIPTS = {  # script -> its flags (published rho and the released configuration's switches)
    "robust_vdn_rho": ["--rho", "0.1", "--single-coin", "--max-grad-norm", "1.0"],
    "robust_vdn_tv": ["--rho", "0.5"],
    "robust_qmix_rho": ["--rho", "0.1", "--optimizer", "adam", "--single-coin"],
    "robust_qmix_tv": ["--rho", "0.2", "--dual-loss", "squared", "--no-eta-clamp"],
    "robust_qtran_rho": ["--rho", "0.1", "--optimizer", "adam", "--single-coin"],
    "robust_qtran_tv": ["--rho", "0.2", "--worst-value", "batch-min", "--dual-max-grad-norm", "1.0"],
    "groupdr_vdn": [],
    "groupdr_qmix": [],
    "groupdr_qtran": [],
}
GROUPDR_TASKS = ("building",)


def run(tree: str, script: str, flags: list[str], cwd: str) -> None:
    cmd = [sys.executable, os.path.join(tree, "algos", f"{script}.py"), *flags, "--torch-threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def flatten(obj, prefix=""):
    """(path, leaf) pairs of nested dicts / lists / tuples; leaves are tensors, arrays or plain values."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def as_array(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x) if isinstance(x, np.ndarray) else x


def equal(a, b) -> bool:
    a, b = as_array(a), as_array(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == np.uint32 or b.dtype == np.uint32:  # the legacy numpy RNG keys: int64 in today's files
            a, b = a.astype(np.int64), b.astype(np.int64)
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def run_state(path: str) -> dict:
    ckpt = runs.safe_load(path, "same_numbers")
    if ckpt["format"] == "drigm-run-checkpoint-v1":
        ckpt = runs.upgrade_run_checkpoint(ckpt)
    return {"counters": ckpt["counters"], "state": ckpt["state"], "rng": ckpt["rng"]}


def model_state(path: str) -> dict:
    ckpt = runs.load_model(path, "same_numbers")
    return {k: v for k, v in ckpt.items() if isinstance(v, dict) and k not in ("args", "env")}


def compare(a: dict, b: dict) -> list[str]:
    fa, fb = dict(flatten(a)), dict(flatten(b))
    bad = [f"only in before: {k}" for k in sorted(set(fa) - set(fb))] + [f"only after: {k}" for k in sorted(set(fb) - set(fa))]
    bad += [f"differs: {k}" for k in fa if k in fb and not equal(fa[k], fb[k])]
    return bad, len(fa)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--before", required=True, help="checkout of the old code (e.g. git worktree add /tmp/before <commit>)")
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="GroupDR: building only")
    p.add_argument("--fused-modes", nargs="+", default=["fused", "no-fused"], choices=["fused", "no-fused"])
    p.add_argument("--estimator", default="", help="GroupDR: estimator.pt (default: made once with the old tree, tiny)")
    p.add_argument("--flags", default="", help="more flags for every run, e.g. '--update-schedule released' (TV scripts)")
    a = p.parse_args()
    failures, compared = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        estimator = a.estimator
        if any(s.startswith("groupdr") for s in a.scripts) and not estimator:
            run(
                a.before,
                "groupdr_vdn",
                [
                    "--observed-reward",
                    "--total-episodes",
                    "1",
                    "--episode-steps",
                    "20",  # stage 0
                    "--learning-starts",
                    "8",
                    "--batch-size",
                    "8",
                    "--save-model",
                    "--run-name",
                    "b",
                ],
                tmp,
            )
            run(
                a.before,
                "groupdr_estimator",
                [
                    "--run-name",
                    "est",
                    "--behaviour-checkpoint",
                    "runs/b/model.pt",
                    "--fit",
                    "offline",
                    "--episodes-per-config",
                    "1",
                    "--fit-steps",
                    "20",
                    "--episode-steps",
                    "20",
                ],
                tmp,
            )
            estimator = os.path.join(tmp, "runs", "est", "estimator.pt")
        for script in a.scripts:
            tasks = [t for t in a.tasks if not script.startswith("groupdr") or t in GROUPDR_TASKS]
            extra = SCRIPTS[script] + (["--estimator-checkpoint", estimator] if script.startswith("groupdr") else [])
            extra += shlex.split(a.flags)
            for task in tasks:
                for fused in (f"--{m}" for m in a.fused_modes):
                    base = TASKS[task][2:] if script.startswith("groupdr") else TASKS[task]
                    flags = [*base, *extra, fused, "--save-model", "--checkpoint-every", "1"]
                    tag = f"{script}-{task}-{fused[2:]}"
                    for name, tree in (("before", a.before), ("after", ROOT)):
                        run(tree, script, [*flags, "--run-name", f"{tag}-{name}"], tmp)
                    d = {n: os.path.join(tmp, "runs", f"{tag}-{n}") for n in ("before", "after")}
                    bad, n1 = compare(run_state(f"{d['before']}/checkpoint.pt"), run_state(f"{d['after']}/checkpoint.pt"))
                    bad2, n2 = compare(model_state(f"{d['before']}/model.pt"), model_state(f"{d['after']}/model.pt"))
                    # resume: the old tree's run cut after 2 episodes, continued by this tree
                    total = flags[flags.index("--total-episodes") + 1]
                    cut = [*flags, "--run-name", f"{tag}-cut"]
                    cut[cut.index("--total-episodes") + 1] = str(int(total) - 1)
                    run(a.before, script, cut, tmp)
                    run(ROOT, script, ["--resume", os.path.join("runs", f"{tag}-cut"), "--total-episodes", total], tmp)
                    bad3, n3 = compare(
                        run_state(f"{d['after']}/checkpoint.pt"), run_state(f"{tmp}/runs/{tag}-cut/checkpoint.pt")
                    )
                    status = "EQUAL" if not (bad or bad2 or bad3) else "DIFFERENT"
                    failures += status != "EQUAL"
                    compared += 1
                    print(f"{tag:42s} {status}: checkpoint {n1} leaves, model {n2}, old-run resumed {n3}", flush=True)
                    objects = sorted({x.split("/")[2] for x in bad + bad3 if x.startswith("differs: /state/")})
                    if objects:
                        print(f"    objects that differ: {', '.join(objects)}")
                    for line in (bad + bad2 + [f"resumed: {x}" for x in bad3])[:12]:
                        print(f"    {line}")
    if not compared:
        print("nothing compared")
        return 1
    print(f"all {compared} comparisons equal" if not failures else f"{failures} of {compared} comparisons differ")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
