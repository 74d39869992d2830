"""The readability refactor of 2026-12-02 (named DRQN layers, Batch, runs.py) moved no number.

experiments/same_numbers.py compares tiny runs of the code before it (commit PRE_REFACTOR, taken from this
repository's own history with `git archive`) and of today's tree: checkpoint.pt (networks, targets, optimiser
states, replay buffer and its V' cache, every RNG state) and model.pt, torch.equal leaf by leaf, plus a run of the
old code resumed by the new one. Here: robust_qmix_tv (agents, mixer, dual network, two minibatches) on the building
task with the fused kernels; the refactor's note shows all nine scripts x {building, matrix} x {fused, no-fused}.
A second test checks that the comparison can fail: a tree with one planted change must be reported as different.
Skipped where the repository has no history (a shallow clone or an exported tree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SUBPROCESS_TIMEOUT

PRE_REFACTOR = "797af2c"  # the last commit before the refactor (issue 17)


def export_tree(commit: str, dest: str) -> None:
    try:
        archive = subprocess.run(
            ["git", "-C", ROOT, "archive", commit, "algos", "envs.py", "eval.py", "fused.py"],
            capture_output=True,
            check=True,
            timeout=120,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"commit {commit} not in this checkout's history ({type(e).__name__})")
    os.makedirs(dest)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True, timeout=120)


def same_numbers(root: str, before: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        os.path.join(root, "experiments", "same_numbers.py"),
        "--before",
        before,
        "--scripts",
        "robust_qmix_tv",
        "--tasks",
        "building",
        "--fused-modes",
        "fused",
        *extra,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("before") / "tree")
    export_tree(PRE_REFACTOR, dest)
    return dest


def test_refactor_moved_no_number(before):
    proc = same_numbers(ROOT, before)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "robust_qmix_tv-building-fused" in proc.stdout and "EQUAL" in proc.stdout and "all 1 comparisons equal" in proc.stdout
    )


def test_same_numbers_sees_a_planted_change(before, tmp_path):
    """Today's tree with the dual step's learning rate read one digit off: the check must say DIFFERENT."""
    tree = tmp_path / "planted"
    for name in ("algos", "experiments"):
        shutil.copytree(os.path.join(ROOT, name), tree / name)
    for name in ("envs.py", "eval.py", "fused.py", "runs.py"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    script = tree / "algos" / "robust_qmix_tv.py"
    text = script.read_text()
    assert "lr=args.dual_learning_rate" in text
    script.write_text(text.replace("lr=args.dual_learning_rate", "lr=1.01 * args.dual_learning_rate", 1))
    proc = same_numbers(str(tree), before)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    differ = [line for line in proc.stdout.splitlines() if "objects that differ:" in line]
    assert "DIFFERENT" in proc.stdout and differ and "dual_network" in differ[0] and "dual_optimizer" in differ[0], proc.stdout
