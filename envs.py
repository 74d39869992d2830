"""Environment adapters shared by every script in ``algos/`` and by ``eval.py``.

Every task implements one small interface (the one the DRQN scripts are written against)::

    env.n_agents, env.n_actions, env.obs_dim, env.state_dim, env.episode_limit
    obs, state, avail = env.reset(day)          # (N, obs_dim), (state_dim,), (N, n_actions) bool
    obs, state, avail, reward, terminated, truncated, info = env.step(actions)   # actions: (N,) int

``reward`` is the team reward (one float), ``terminated`` marks a true terminal state (no
bootstrapping) and ``truncated`` a time limit (bootstrap as usual).

Building task (SustainGym ``MultiAgentBuildingEnv``, paper Appendix F.1)
-------------------------------------------------------------------------
* Configs ``env_1``..``env_6`` are the (weather, location) pairs of paper Table 3.
* Agent i observes Eq. (31): ``(T_i, T_out, T_ground, GHI, occupancy)``, i.e. indices
  ``[i, N, N+1, N+2, N+3]`` of the 10-dim vector the simulator hands every agent.
  The global state (mixer, QTRAN, dual network) is that full vector (Eq. 30). No scaling.
* Team reward = the sum of the agents' (identical) rewards, the quantity that the normalised
  return of Eq. (33) is defined on.
* An episode is one day (288 five-minute steps). Its end is a time limit: ``truncated=True``,
  ``terminated=False``.
* ``reset(day)`` starts at day-of-year ``day % 365``. sustaingym maps ``reset(seed=d)`` to
  sample ``int(d/365 * L)`` of its one-year weather file and silently clamps any ``d >= 365`` to
  the last sample of the year, so a seed >= 365 is never passed through.

StarCraft tasks (``smax``, ``smac``) implement the same interface; see the bottom of this file.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys

import numpy as np

ENV_IDS = ("building",)

# Paper Table 3: config name -> (sustaingym weather, location). env_1 is the training config.
BUILDING_CONFIGS = {
    "env_1": ("Hot_Dry", "Tucson"),
    "env_2": ("Hot_Humid", "Tampa"),
    "env_3": ("Very_Hot_Humid", "Honolulu"),
    "env_4": ("Warm_Dry", "ElPaso"),
    "env_5": ("Cool_Marine", "Seattle"),
    "env_6": ("Mixed_Humid", "NewYork"),
}
DAYS_PER_YEAR = 365
# Normalised return of Eq. (33): (R + 9000) / 9000, R = team return of one day.
NORM_OFFSET = 9000.0

# Every (env_id, config) this process has built, in order: lets tests assert, through the
# factory, that e.g. env_6 is never constructed during training.
BUILD_LOG: list[tuple[str, str]] = []


class EnvArgError(ValueError):
    """A bad --env / --train-config value; its message is one line naming the flag."""


def fail(message: str) -> None:
    """Print one clear error line and exit non-zero (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_env_args(env_id: str, config: str, flag: str = "--train-config") -> None:
    """Validate ``--env`` / ``--train-config`` before anything is built."""
    if env_id not in available_env_ids():
        raise EnvArgError(f"--env '{env_id}' is unknown; accepted: {', '.join(available_env_ids())}")
    if env_id == "building" and config not in BUILDING_CONFIGS:
        raise EnvArgError(f"{flag} '{config}' is unknown for --env building; accepted: {', '.join(BUILDING_CONFIGS)}")
    if env_id in STARCRAFT_ENV_IDS:
        _check_starcraft_config(env_id, config, flag)


def default_config(env_id: str) -> str:
    """The config a script trains on when --train-config is left at its default."""
    return {"building": "env_1"}.get(env_id, STARCRAFT_DEFAULT_MAP)


@functools.lru_cache(maxsize=None)
def _building_parameters(config: str) -> dict:
    """sustaingym's ParameterGenerator for one config, built once per process (it takes ~1 s)."""
    from sustaingym.envs.building import ParameterGenerator

    weather, location = BUILDING_CONFIGS[config]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a zone table on every call
        return ParameterGenerator(
            building="OfficeSmall", weather=weather, location=location, ac_map=1, is_continuous_action=False
        )


class BuildingTask:
    """SustainGym multi-agent BuildingEnv (OfficeSmall, 6 zones, 200 discrete actions per agent)."""

    def __init__(self, config: str = "env_1"):
        from sustaingym.envs.building import MultiAgentBuildingEnv

        self.config = config
        self.env = MultiAgentBuildingEnv(_building_parameters(config))
        self.n_agents = len(self.env.possible_agents)
        self.n_actions = int(self.env.action_spaces[self.env.possible_agents[0]].n)
        self.state_dim = int(self.env.single_env.observation_space.shape[0])  # N + 4
        self.obs_dim = 5
        self.episode_limit = int(self.env.single_env.episode_len)  # 288 five-minute steps
        n = self.n_agents
        # Eq. (31): agent i sees its own zone temperature and the four shared quantities.
        self.obs_index = np.array([[i, n, n + 1, n + 2, n + 3] for i in range(n)])
        self._avail = np.ones((n, self.n_actions), dtype=bool)  # every action is always available
        self._t = 0

    def _split(self, state: np.ndarray):
        state = np.asarray(state, dtype=np.float32)
        return state[self.obs_index], state.copy(), self._avail.copy()

    def reset(self, day: int):
        """Start the day-of-year ``day % 365`` (never a seed >= 365, see module docstring)."""
        self._t = 0
        obss, _ = self.env.reset(seed=int(day) % DAYS_PER_YEAR)
        return self._split(obss[self.env.possible_agents[0]])

    def step(self, actions):
        actions = np.asarray(actions).reshape(self.n_agents)
        obss, rewards, _, truncs, infos = self.env.step([int(a) for a in actions])
        agent0 = self.env.possible_agents[0]
        self._t += 1
        team_reward = float(sum(rewards[a] for a in self.env.possible_agents))
        # The simulator reports terminated=truncated=True at the end of the day: a time limit.
        truncated = bool(truncs[agent0]) or self._t >= self.episode_limit
        obs, state, avail = self._split(obss[agent0])
        return obs, state, avail, team_reward, False, truncated, {}


def make_env(env_id: str, config: str | None = None, seed: int = 0):
    """Build a task. ``config``: building ``env_1``..``env_6``; StarCraft: a map name."""
    config = default_config(env_id) if config is None else config
    check_env_args(env_id, config)
    BUILD_LOG.append((env_id, config))
    if env_id == "building":
        return BuildingTask(config)
    return _make_starcraft(env_id, config, seed)


def available_env_ids() -> tuple[str, ...]:
    return ENV_IDS + STARCRAFT_ENV_IDS


def normalised_return(team_return: float) -> float:
    """Eq. (33)."""
    return (team_return + NORM_OFFSET) / NORM_OFFSET


# ---------------------------------------------------------------------------------------------
# StarCraft (SMAC / smacv2 with the real game, SMAX as a CPU stand-in). Filled in by the
# StarCraft adapter; until then these names keep the building task importable on its own.
# ---------------------------------------------------------------------------------------------
STARCRAFT_ENV_IDS: tuple[str, ...] = ()
STARCRAFT_DEFAULT_MAP = "3s_vs_5z"


def _check_starcraft_config(env_id: str, config: str, flag: str) -> None:  # pragma: no cover
    raise EnvArgError(f"--env '{env_id}' is not available")


def _make_starcraft(env_id: str, config: str, seed: int):  # pragma: no cover
    raise EnvArgError(f"--env '{env_id}' is not available")
