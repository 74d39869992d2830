"""What each factorisation learns on the cooperative matrix games (``--env matrix``), as markdown.

    python -m tests.matrix_report            # trains the 11 runs below (~15 s of one core each), prints tables
    python -m tests.matrix_report --workers 4

The tables of docs/matrix_games.md are this command's output. It is also the plumbing of
tests/test_matrix_games.py: the settings of a fast run (``run_args``) and ``Learned``, which reads
a run's model.pt and evaluates the learned networks on every history of the game (Q_tot of each
joint action, the greedy value the target uses, the greedy rollout, the dual variable eta).
The closed-form answers the tests compare against are computed in the test file itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from conftest import describe, import_file, run_py

import envs

# A run that converges in seconds: uniform exploration (epsilon 1 throughout), a window of one step
# (the state says where the episode is), a small network, a replay that keeps every transition, a
# target copy every 100 steps. Seed fixed; the scripts are deterministic on CPU.
FAST = [
    "--start-e",
    "1",
    "--end-e",
    "1",
    "--hidden-dim",
    "16",
    "--window",
    "1",
    "--buffer-size",
    "10000",
    "--batch-size",
    "128",
    "--learning-rate",
    "2e-3",
    "--target-network-frequency",
    "100",
    "--gamma",
    "0.99",
    "--torch-threads",
    "1",
    "--log-every",
    "100000",
    "--save-model",
    "--seed",
    "1",
]
EPISODES = {"one-step": 8000, "two-step": 4000}  # 8,000 env steps either way
RHO, GAMMA = 0.2, 0.99  # the robust runs' radius; gamma as in the QMIX paper's two-step game
ACTIONS = "ABC"


def run_args(game: str, run_name: str, *flags: str) -> list[str]:
    """CLI arguments of one fast matrix run (``flags`` last, so they override FAST)."""
    return [
        "--env",
        "matrix",
        "--train-config",
        game,
        "--total-episodes",
        str(EPISODES[game]),
        *FAST,
        "--run-name",
        run_name,
        *flags,
    ]


def run_jobs(jobs: list[tuple[str, list[str], str]], workers: int = 2, timeout: float = 900):
    """conftest.run_parallel with a longer per-run limit (a loaded machine, a first kernel build)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_py, script, *args, cwd=cwd, timeout=timeout) for script, args, cwd in jobs]
        return [f.result() for f in futures]


def kind(algo: str) -> str:
    return next(k for k in ("vdn", "qmix", "qtran") if k in algo)


class Learned:
    """The networks of one matrix run, evaluated on explicit histories.

    A history is (positions, joint actions): the positions the episode visited so far (indices
    into ``game.positions``; the last one is the current) and the joint actions taken between
    them. Windows are built as the scripts' replay builds them: the last W (obs, previous action)
    pairs, zero-padded in front, previous action 0 at t = 0."""

    def __init__(self, model_path: str):
        eval_mod = import_file("eval_under_test", "eval.py")
        ckpt = torch.load(model_path, map_location="cpu", weights_only=False)
        self.label, self.module, self.q_network, self.env_info, self.args = eval_mod.load_checkpoint(model_path, "cpu")
        self.algo, self.kind = ckpt["algo"], kind(ckpt["algo"])
        self.game = envs.make_env("matrix", self.env_info["config"])
        g, a, m = self.game, self.args, self.module
        self.mixer = self.joint = self.dual = None
        if "mixer" in ckpt:
            self.mixer = m.QMixer(g.n_agents, g.state_dim, a["mixing_embed_dim"])
            self.mixer.load_state_dict(ckpt["mixer"])
        if "joint" in ckpt:
            self.joint = m.QTranNetworks(g.n_agents, g.n_actions, g.state_dim, a["hidden_dim"])
            self.joint.load_state_dict(ckpt["joint"])
        if "dual" in ckpt:
            self.dual = m.DualNetwork(g.state_dim, g.n_agents, g.n_actions, a["dual_hidden_dim"])
            self.dual.load_state_dict(ckpt["dual"])
        self.window = a["window"]

    # ----------------------------------------------------------------- histories and windows
    def _onehot(self, pos: int) -> np.ndarray:
        v = np.zeros(self.game.state_dim, dtype=np.float32)
        v[pos] = 1.0
        return v

    def _window(self, positions, actions):
        W, N = self.window, self.game.n_agents
        obs = np.zeros((W, 1, N, self.game.obs_dim), dtype=np.float32)
        prev = np.zeros((W, 1, N), dtype=np.int64)
        t = len(positions) - 1
        for k in range(W):  # window slot W-1-k holds time step t-k
            tau = t - k
            if tau >= 0:
                obs[W - 1 - k, 0] = self._onehot(positions[tau])
            if tau >= 1:
                prev[W - 1 - k, 0] = actions[tau - 1]
        return torch.from_numpy(obs), torch.from_numpy(prev)

    @torch.no_grad()
    def agent_q(self, positions, actions) -> np.ndarray:
        """(N, n_actions): every agent's Q_i at the history."""
        return self.q_network.greedy_q(*self._window(positions, actions))[0].numpy()

    @torch.no_grad()
    def q_tot(self, positions, actions, joint) -> float:
        """Q_tot (VDN sum, QMIX mixer, QTRAN Q_jt) of joint action ``joint`` at the history."""
        obs_w, prev_w = self._window(positions, actions)
        joint_t = torch.tensor([list(joint)], dtype=torch.int64)
        state = torch.from_numpy(self._onehot(positions[-1]))[None]
        if self.kind == "qtran":
            _, feats = self.q_network.greedy_q(obs_w, prev_w, with_features=True)
            return float(self.joint.q_jt(feats.sum(1), joint_t)[0])
        q = self.q_network.greedy_q(obs_w, prev_w)
        q_taken = q.gather(-1, joint_t.unsqueeze(-1)).squeeze(-1)  # (1, N)
        return float(self.mixer(q_taken, state)[0]) if self.kind == "qmix" else float(q_taken.sum())

    def greedy(self, positions, actions) -> tuple[int, ...]:
        """The agents' individual greedy actions (decentralised execution)."""
        return tuple(int(a) for a in self.agent_q(positions, actions).argmax(-1))

    def value(self, positions, actions) -> float:
        """Q_tot at the individual greedy actions: the V' every script's target uses (DrIGM)."""
        return self.q_tot(positions, actions, self.greedy(positions, actions))

    def table(self, positions, actions) -> np.ndarray:
        """(A, A): Q_tot of every joint action at the history."""
        A = self.game.n_actions
        return np.array([[self.q_tot(positions, actions, (i, j)) for j in range(A)] for i in range(A)])

    @torch.no_grad()
    def eta(self, position: int, joint) -> float:
        state = torch.from_numpy(self._onehot(position))[None]
        return float(self.dual(state, torch.tensor([list(joint)], dtype=torch.int64))[0])

    def rollout(self) -> tuple[float, list[tuple[int, ...]]]:
        """One greedy episode on the real env: (return, joint actions)."""
        _obs, state, _ = self.game.reset(0)
        positions, actions, total = [int(state.argmax())], [], 0.0
        for _ in range(self.game.episode_limit):
            a = self.greedy(positions, actions)
            _, state, _, reward, terminated, truncated, _ = self.game.step(a)
            total += reward
            actions.append(a)
            positions.append(int(state.argmax()))
            if terminated or truncated:
                break
        return total, actions

    # ------------------------------------------------------------- the two games' histories
    def second_step(self, matrix: str, first_a2: int | None = None) -> np.ndarray:
        """Two-step game: Q_tot table of matrix 2A/2B. The history also holds agent 2's first
        action (its previous-action input); None averages the two (uniform exploration)."""
        a1 = self.game.positions.index(matrix) - 1
        a2s = [first_a2] if first_a2 is not None else range(self.game.n_actions)
        return np.mean([self.table([0, 1 + a1], [(a1, a2)]) for a2 in a2s], axis=0)

    def next_values_first_step(self) -> np.ndarray:
        """Two-step game: V' of the step-2 history each first-step joint action leads to, (A, A)."""
        A = self.game.n_actions
        return np.array([[self.value([0, 1 + a1], [(a1, a2)]) for a2 in range(A)] for a1 in range(A)])


def fmt(table, digits=2) -> str:
    """A small matrix as a markdown cell: rows separated by ' / '."""
    return " / ".join(", ".join(f"{v:.{digits}f}" for v in row) for row in np.asarray(table))


def joint_name(joint) -> str:
    return "(" + ", ".join(ACTIONS[a] for a in joint) + ")"


REPORT_RUNS = [  # (label, script, game, extra flags)
    ("VDN", "robust_vdn_rho", "one-step", []),
    ("QMIX", "robust_qmix_rho", "one-step", []),
    ("QTRAN", "robust_qtran_rho", "one-step", []),
    ("VDN", "robust_vdn_rho", "two-step", []),
    ("QMIX", "robust_qmix_rho", "two-step", []),
    ("QTRAN", "robust_qtran_rho", "two-step", []),
    (f"VDN rho={RHO}", "robust_vdn_rho", "two-step", ["--rho", str(RHO)]),
    (f"QMIX rho={RHO}", "robust_qmix_rho", "two-step", ["--rho", str(RHO)]),
    (f"QMIX-TV rho={RHO}", "robust_qmix_tv", "two-step", ["--rho", str(RHO)]),
    (
        f"VDN-TV rho={RHO} squared, no clamp",
        "robust_vdn_tv",
        "two-step",
        ["--rho", str(RHO), "--dual-loss", "squared", "--no-eta-clamp"],
    ),
    ("QTRAN-TV rho=0.5 batch-min", "robust_qtran_tv", "two-step", ["--rho", "0.5", "--worst-value", "batch-min"]),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="training runs at a time")
    parser.add_argument(
        "--out",
        default="",
        help="keep the runs under this folder (default: a temporary one); "
        "a run whose model.pt is already there is not trained again",
    )
    opts = parser.parse_args(argv)
    cwd = opts.out or tempfile.mkdtemp(prefix="matrix_report_")
    os.makedirs(cwd, exist_ok=True)
    names = [f"{script}_{game}_" + "_".join(f.strip("-") for f in flags) for _, script, game, flags in REPORT_RUNS]
    models = [os.path.join(cwd, "runs", name, "model.pt") for name in names]
    jobs = [
        (f"algos/{script}.py", run_args(game, name, *flags), cwd)
        for name, model, (_, script, game, flags) in zip(names, models, REPORT_RUNS)
        if not os.path.isfile(model)
    ]
    for proc in run_jobs(jobs, workers=opts.workers):
        if proc.returncode != 0:
            raise SystemExit(describe(proc))
    learned = [Learned(model) for model in models]

    print(
        f"Settings of every run: `{' '.join(FAST)}`, one-step {EPISODES['one-step']} episodes, "
        f"two-step {EPISODES['two-step']} episodes (`tests/matrix_report.py`).\n"
    )
    print("### One-step game (payoff 8 / -12 / 0; optimum (A, A) = 8)\n")
    print("| method | learned Q_tot (rows: agent 1 A, B, C) | individual greedy | greedy return |")
    print("|---|---|---|---|")
    for (label, _, game, _), lrn in zip(REPORT_RUNS, learned):
        if game == "one-step":
            ret, acts = lrn.rollout()
            print(f"| {label} | {fmt(lrn.table([0], []))} | {joint_name(acts[0])} | {ret:g} |")
    print("\n### Two-step game (2A = all 7, 2B = [[0, 1], [1, 8]]; optimum: B, then (B, B) = 8)\n")
    print("| method | step 1 Q_tot | state 2A Q_tot | state 2B Q_tot | greedy actions | greedy return |")
    print("|---|---|---|---|---|---|")
    for (label, _, game, _), lrn in zip(REPORT_RUNS, learned):
        if game == "two-step":
            ret, acts = lrn.rollout()
            print(
                f"| {label} | {fmt(lrn.table([0], []))} | {fmt(lrn.second_step('2A'))} | "
                f"{fmt(lrn.second_step('2B'))} | {' then '.join(map(joint_name, acts))} | {ret:g} |"
            )


if __name__ == "__main__":
    main()
