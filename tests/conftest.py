"""Shared fixtures and helpers for the tests.

* ``ROOT``: the repository root (put on sys.path so ``import envs`` works from any cwd).
* ``vdn``: algos/robust_vdn_rho.py imported as a module (spec_from_file_location), so its
  classes and functions can be tested without running its ``__main__`` block.
* ``eval_mod``: eval.py imported the same way.
* ``run_py(script, *args, cwd=...)``: run a repository script with ``sys.executable`` in a
  given cwd (scripts write runs/ and results/ relative to it) and return the CompletedProcess.
* ``SUBPROCESS_TIMEOUT``: the hard cap (30 min) on any subprocess a test waits for.
* ``run_parallel(jobs)``: the same for a list of jobs, a few at a time (2-core machine).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

# The machine has 2 cores shared with other jobs: one intra-op thread in this process too.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def import_file(name: str, relpath: str):
    """Import ROOT/relpath as module ``name`` (cached in sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# A hard cap on every subprocess a test waits for, not a speed limit: the suite runs beside training runs
# (a reproduction sweep on every core), where a job that takes 20 s on a quiet machine can take minutes. It
# only has to end a hung CI job; TEST_SUBPROCESS_TIMEOUT (seconds) overrides it.
SUBPROCESS_TIMEOUT = float(os.environ.get("TEST_SUBPROCESS_TIMEOUT", "1800"))


def run_py(script: str, *args: str, cwd: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ROOT/script with the current interpreter in ``cwd``; capture stdout and stderr. ``timeout``:
    SUBPROCESS_TIMEOUT unless given."""
    timeout = SUBPROCESS_TIMEOUT if timeout is None else timeout
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env())


def run_parallel(jobs: list[tuple[str, list[str], str]], workers: int = 3) -> list[subprocess.CompletedProcess]:
    """jobs: (script, args, cwd) -> results in the same order, at most ``workers`` at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_py, script, *args, cwd=cwd) for script, args, cwd in jobs]
        return [f.result() for f in futures]


def describe(proc: subprocess.CompletedProcess) -> str:
    """Everything a failing assertion should show about a subprocess."""
    return f"cmd: {proc.args}\nrc: {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@pytest.fixture(scope="session")
def root() -> str:
    return ROOT


@pytest.fixture(scope="session")
def vdn():
    """algos/robust_vdn_rho.py as a module (its __main__ block does not run)."""
    return import_file("robust_vdn_rho_under_test", "algos/robust_vdn_rho.py")


@pytest.fixture(scope="session")
def eval_mod():
    """eval.py as a module (imported under another name: ``eval`` is a builtin)."""
    return import_file("eval_under_test", "eval.py")


class _Subprocess:
    """Handle on the helpers above, for tests that prefer a fixture to ``from conftest import``."""

    run = staticmethod(run_py)
    parallel = staticmethod(run_parallel)
    describe = staticmethod(describe)


@pytest.fixture(scope="session")
def sp() -> _Subprocess:
    return _Subprocess()


def pytest_collection_finish(session):
    """Start the subprocess jobs of test modules that define ``start_background_jobs`` (and stop
    them, ``stop_background_jobs``, at the end), so they run while the in-process tests do."""
    if session.config.option.collectonly:
        return
    started = set()
    for item in session.items:
        module = getattr(item, "module", None)
        start = getattr(module, "start_background_jobs", None)
        if start is None or module in started:
            continue
        started.add(module)
        start()
        session.config.add_cleanup(module.stop_background_jobs)


def pytest_collection_modifyitems(session, config, items):
    """Run the tests of modules with background jobs last, so their jobs overlap the others."""
    background = [it for it in items if hasattr(getattr(it, "module", None), "start_background_jobs")]
    if background:
        rest = [it for it in items if not hasattr(getattr(it, "module", None), "start_background_jobs")]
        items[:] = rest + background


def run_script_in_process(script: str, args, cwd: str) -> dict:
    """ROOT/script run as __main__ in this process (argv = args, working directory cwd) -> the
    script's global namespace when it ends: its replay buffer ``rb``, networks, optimiser, last
    minibatch ``b`` (a Batch) ... so a test can check what the real training loop did. No interpreter
    start-up (torch is already imported). sys.argv, the cwd and torch's global settings (deterministic
    algorithms, threads, NaN-fill of torch.empty) are restored afterwards."""
    import runpy

    saved = (
        sys.argv,
        os.getcwd(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    sys.argv = [os.path.join(ROOT, script), *map(str, args)]
    os.chdir(cwd)
    try:
        return runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.use_deterministic_algorithms(saved[2])
        torch.set_num_threads(saved[3])
        torch.utils.deterministic.fill_uninitialized_memory = saved[4]
