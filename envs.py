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
So do the cooperative matrix games (``matrix``: ``one-step``, ``two-step``), see "matrix games" below.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

ENV_IDS = ("building", "matrix")

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
    if env_id == "matrix" and config not in MATRIX_GAMES:
        raise EnvArgError(f"{flag} '{config}' is unknown for --env matrix; accepted: {', '.join(MATRIX_GAMES)}")
    if env_id in STARCRAFT_ENV_IDS:
        _check_starcraft_config(env_id, config, flag)


@dataclass
class EnvArgs:
    """The task flags of the six robust scripts (checked by runs.check_run_args); their Args extends this class and
    runs.RunArgs."""

    env: Literal["building", "matrix", "smax", "smac"] = "building"
    """task: building (SustainGym), smax (JaxMARL 3s_vs_5z), smac (StarCraft II) or matrix (one-step / two-step games)"""
    train_config: str = ""
    """building config env_1..env_6 (paper Table 3) or StarCraft map (default: env_1 / 3s_vs_5z)"""
    train_days: str = "0:200"
    """building: day-of-year range [a, b) a training episode is drawn from (paper: days 0-199)"""
    episode_steps: int = 0
    """cap on steps per episode, a time limit (0 = the env's own limit, 288 for building)"""
    total_steps: int = 0
    """also stop after this many env steps (0 = no limit; StarCraft default 1,000,000)"""
    eval_every: int = 10_000
    """StarCraft: evaluate every this many env steps, clean and noisy (paper Sec. 5.2); 0 = never"""
    eval_episodes: int = 32
    """StarCraft: greedy episodes per evaluation"""
    eval_sigma: float = 0.75
    """StarCraft: std of the test-time N(0, sigma^2) noise on enemy positions"""


# StarCraft: where the paper is silent, SMAC-literature values (pymarl) replace the building
# defaults of the fields a user left at their default. checkpoint_every=0: SMAX episodes are short
# (~50 steps) and the 50,000-transition buffer makes a checkpoint ~120 MB, so StarCraft runs
# checkpoint by time only (--checkpoint-minutes, every 10 minutes by default) and at the end.
STARCRAFT_DEFAULTS = {
    "gamma": 0.99,
    "end_e": 0.05,
    "exploration_steps": 50_000,
    "buffer_size": 50_000,
    "target_network_frequency": 10_000,
    "total_episodes": 1_000_000,
    "total_steps": 1_000_000,
    "checkpoint_every": 0,
}


def apply_env_defaults(args, defaults) -> bool:
    """Fill --train-config and, for StarCraft / matrix games, STARCRAFT_DEFAULTS / MATRIX_DEFAULTS
    (each only where the user left the field at its default); returns True for StarCraft."""
    args.train_config = args.train_config or default_config(args.env)
    starcraft = args.env in STARCRAFT_ENV_IDS
    env_defaults = STARCRAFT_DEFAULTS if starcraft else MATRIX_DEFAULTS if args.env == "matrix" else {}
    for key, value in env_defaults.items():
        if hasattr(args, key) and getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)
    return starcraft


class History:
    """What the agents' DRQNs see (paper F.2), like a frame stack: the acting window of E parallel episodes, the last
    W (obs, previous action) pairs, padded at the front with zero observations and previous-action index 0 (also the
    t=0 previous action). The algos/ scripts act on it; their replay buffers rebuild the same windows at sample time."""

    def __init__(self, n_envs, window, n_agents, obs_dim):
        self.obs = np.zeros((window, n_envs, n_agents, obs_dim), dtype=np.float32)
        self.prev_a = np.zeros((window, n_envs, n_agents), dtype=np.int64)

    def reset(self, obs):
        self.obs[:] = 0.0
        self.prev_a[:] = 0
        self.obs[-1] = obs

    def push(self, obs, prev_actions):
        self.obs = np.roll(self.obs, -1, axis=0)
        self.prev_a = np.roll(self.prev_a, -1, axis=0)
        self.obs[-1], self.prev_a[-1] = obs, prev_actions

    def tensors(self, device):
        import torch

        return torch.from_numpy(self.obs).to(device), torch.from_numpy(self.prev_a).to(device)


def default_config(env_id: str) -> str:
    """The config a script trains on when --train-config is left at its default."""
    return {"building": "env_1", "matrix": "two-step"}.get(env_id, STARCRAFT_DEFAULT_MAP)


@functools.cache
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
        obss, rewards, _, truncs, _ = self.env.step([int(a) for a in actions])
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
    if env_id == "matrix":
        return MatrixGame(config)
    return _make_starcraft(env_id, config, seed)


def available_env_ids() -> tuple[str, ...]:
    return ENV_IDS + STARCRAFT_ENV_IDS


def normalised_return(team_return: float) -> float:
    """Eq. (33)."""
    return (team_return + NORM_OFFSET) / NORM_OFFSET


# ---------------------------------------------------------------------------------------------
# Cooperative matrix games (``--env matrix``): tiny tasks whose answers are known in closed form
# ---------------------------------------------------------------------------------------------
#
# ``--train-config one-step`` (Son et al. 2019, QTRAN, Table 1a): 2 agents, 3 actions (A, B, C),
#   one step, team reward PAYOFF_ONE_STEP[a_1, a_2]; the optimum (A, A) = 8 is surrounded by -12.
# ``--train-config two-step`` (Rashid et al. 2018, QMIX, Fig. 3): 2 agents, 2 actions (A, B).
#   Step 1 pays 0 and agent 1's action picks the step-2 matrix (A -> 2A, B -> 2B), whatever agent 2
#   does; step 2 pays 2A = all 7 or 2B = [[0, 1], [1, 8]]. Optimal return 8 (B then (B, B)).
# The state is a one-hot of where the episode is: one-step (start, end); two-step (step 1, 2A, 2B,
# end). Both agents observe the state (obs_dim = state_dim). The step after the last one is a true
# terminal state ("end"): terminated=True, so no target ever bootstraps from it. Every action is
# always available; reset(day) ignores ``day`` (the games are deterministic).

PAYOFF_ONE_STEP = np.array([[8, -12, -12], [-12, 0, 0], [-12, 0, 0]], dtype=np.float32)
PAYOFF_TWO_STEP = {"2A": np.full((2, 2), 7, dtype=np.float32), "2B": np.array([[0, 1], [1, 8]], dtype=np.float32)}
MATRIX_GAMES = ("one-step", "two-step")
# Fields a matrix run needs changed from the building defaults (where the user left them):
# gamma 0.99 as in the QMIX paper's two-step game; a target copy every 100 steps (25,000 would
# never come); a budget of episodes that converges (one or two steps each); fewer progress lines;
# no periodic resume checkpoint (a run takes seconds; one every 50 one-step episodes would dominate).
MATRIX_DEFAULTS = {
    "gamma": 0.99,
    "target_network_frequency": 100,
    "total_episodes": 4000,
    "log_every": 500,
    "checkpoint_every": 0,
}


class MatrixGame:
    """``--env matrix``: the one-step (QTRAN) or two-step (QMIX) cooperative matrix game."""

    def __init__(self, config: str = "two-step"):
        if config not in MATRIX_GAMES:
            raise EnvArgError(f"--train-config '{config}' is unknown for --env matrix; accepted: {', '.join(MATRIX_GAMES)}")
        self.config, self.label = config, f"matrix {config}"
        self.positions = ("start", "end") if config == "one-step" else ("step 1", "2A", "2B", "end")
        self.n_agents = 2
        self.n_actions = 3 if config == "one-step" else 2
        self.obs_dim = self.state_dim = len(self.positions)
        self.episode_limit = 1 if config == "one-step" else 2
        self._avail = np.ones((self.n_agents, self.n_actions), dtype=bool)
        self._pos = len(self.positions) - 1  # "end": step() before reset() is an error

    def _observe(self):
        state = np.zeros(self.state_dim, dtype=np.float32)
        state[self._pos] = 1.0
        return np.tile(state, (self.n_agents, 1)), state, self._avail.copy()

    def reset(self, day: int = 0):
        """Start an episode (``day`` is ignored: the game is deterministic)."""
        self._pos = 0
        return self._observe()

    def step(self, actions):
        a1, a2 = (int(a) for a in np.asarray(actions).reshape(self.n_agents))
        if self.positions[self._pos] == "end":
            raise RuntimeError("the matrix game is over: call reset(day) first")
        if not (0 <= a1 < self.n_actions and 0 <= a2 < self.n_actions):
            raise ValueError(f"actions must be in [0, {self.n_actions}) (got {a1}, {a2})")
        if self.config == "one-step":
            reward, self._pos = float(PAYOFF_ONE_STEP[a1, a2]), 1
        elif self._pos == 0:  # step 1: agent 1's action picks the matrix, reward 0
            reward, self._pos = 0.0, 1 + a1
        else:
            reward, self._pos = float(PAYOFF_TWO_STEP[self.positions[self._pos]][a1, a2]), 3
        obs, state, avail = self._observe()
        terminated = self.positions[self._pos] == "end"
        return obs, state, avail, reward, terminated, False, {}

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# StarCraft (paper Sec. 5.2): SMAC / smacv2 with the real game, SMAX (JaxMARL) as a CPU stand-in.
# ---------------------------------------------------------------------------------------------
#
# ``--env smax`` (runs anywhere, no game needed)
#   JaxMARL ``HeuristicEnemySMAX``: the learning allies fight scripted heuristic enemies in a JAX
#   re-implementation of SMAC's unit micro. It is NOT StarCraft II: unit stats, sight/attack
#   ranges, the enemy AI and the reward differ. Its results are labelled "SMAX 3s_vs_5z".
#   * config = a SMAX scenario name (default ``3s_vs_5z``: 3 stalkers vs 5 zealots).
#   * 3s_vs_5z: n_agents 3, n_actions 10 (0-3 move, 4 stop, 5+j attack enemy j; a dead agent can
#     only stop), obs_dim 101, state_dim 96, episode_limit 250.
#   * ``reset(day)``: the episode's PRNG key is ``fold_in(PRNGKey(seed), day)``: same seed and day
#     -> same episode (given the same actions). Step keys are split from it inside the jitted step.
#   * The transition is ``env.step_env`` (never the auto-resetting ``env.step``), so the last
#     observation of an episode belongs to that episode.
#   * reward = the (shared) team reward of one ally: enemy health fraction removed this step /
#     n_enemies, + 1 on a win. Max episode return ~2.
#   * terminated = all allies dead or all enemies dead; truncated = the 250-step time limit
#     without either. info["battle_won"] = all enemies dead and at least one ally alive, read from
#     unit liveness (a time-out is never a win).
#   * state: JaxMARL's world state (per unit: health fraction, x, y, weapon cooldown, unit-type
#     one-hot; then every unit's team and type id) rescaled for a mixer: x / map_width, y /
#     map_height (raw 0-32 -> 0-1), cooldown / the unit type's cooldown clipped to [0, 1] (raw it
#     drifts negative without bound while a unit does not fire), type id / (n_types - 1).
#     Health, one-hots and teams are already in [0, 1]. Observations are used as JaxMARL gives
#     them (already normalised: relative positions / the observer's sight range).
#
# ``--env smac`` (needs StarCraft II, see docs/starcraft.md)
#   SMAC's ``StarCraft2Env`` API. config = ``[BACKEND:]MAP``:
#     ``3s_vs_5z``          SMAC v1 (``smac.env``) if importable, else smacv2 (``smacv2.env``);
#     ``smacv1:3s_vs_5z``   force SMAC v1 (faithful backend for the original maps);
#     ``smacv2:3s_vs_5z``   force smacv2 (meant for its own scenarios; see the notes in docs).
#   SC2's randomness is seeded once from ``seed`` at construction; ``reset(day)`` ignores ``day``.
#   SMAC's time-out (terminated with info["episode_limit"]) is mapped to truncated=True,
#   terminated=False.
#
# Test-time observation shift (paper Sec. 5.2): ``ObservationNoise(env, sigma=0.75, seed=s)``
#   adds N(0, sigma^2) to every enemy's relative x and y in every agent's observation, at the
#   indices ``env.enemy_position_indices`` (shape (n_enemies, 2), computed from each env's own
#   feature layout). State, action masks and rewards are untouched.

STARCRAFT_ENV_IDS: tuple[str, ...] = ("smax", "smac")
STARCRAFT_DEFAULT_MAP = "3s_vs_5z"

JAXMARL_INSTALL = "pip install -r requirements.txt (pins jaxmarl==0.2.0, jax/jaxlib 0.10.2)"
SMAC_INSTALL = "pip install git+https://github.com/oxwhirl/smac.git"
SMACV2_INSTALL = "pip install git+https://github.com/oxwhirl/smacv2.git"
SC2_INSTALL = (
    "install StarCraft II 4.10 for Linux (unzip SC2.4.10.zip into ~/StarCraftII or set $SC2PATH) and copy the "
    "SMAC maps (SMAC_Maps.zip from github.com/oxwhirl/smac) into $SC2PATH/Maps/SMAC_Maps; see docs/starcraft.md "
    "(or use --env smax: no game needed)"
)
SMAC_BACKENDS = {"smacv1": "smac", "smacv2": "smacv2"}  # config prefix -> python package
SMAX_NOOP_ACTION = 4  # SMAX's stop action, the only one a dead agent has


# ------------------------------------------- SMAX --------------------------------------------


@contextlib.contextmanager
def _quiet_jaxmarl_import():
    """Silence jaxmarl's import chatter and undo its side effect on sys.stdout/sys.stderr.

    jaxmarl 0.2.0 (environments/mabrax/mabrax_env.py) sets ``sys.stdout, sys.stderr =
    sys.__stdout__, sys.__stderr__`` while importing, which would silently drop any redirection
    (a log tee, pytest's capture) installed by the caller; it then prints two lines to fd 1.
    """
    saved_out, saved_err = sys.stdout, sys.stderr
    for stream in (saved_out, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_fd = None
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            saved_fd = os.dup(1)
            os.dup2(devnull, 1)
        finally:
            os.close(devnull)
    except OSError:  # no usable fd 1: fall back to the Python-level redirect only
        saved_fd = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.__stdout__.flush()  # the chatter buffered there goes to /dev/null, not the terminal
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
        sys.stdout, sys.stderr = saved_out, saved_err


def _import_jaxmarl_smax():
    """Import jax and JaxMARL's SMAX lazily (only for --env smax); EnvArgError if missing."""
    try:
        with _quiet_jaxmarl_import():
            import jax
            import jaxmarl
            from jaxmarl.environments.smax import smax_env
    except ImportError as err:
        raise EnvArgError(f"--env smax needs jaxmarl ({err}); run: {JAXMARL_INSTALL}") from None
    return jax, jaxmarl, smax_env


@functools.cache
def _smax_compiled(map_name: str, max_steps: int = 250):
    """One HeuristicEnemySMAX per (map, limit) and process, with its jitted reset/step, warmed up.

    Returns ``(env, reset_fn, step_fn, dims)``, dims = (obs_dim, state_dim, n_actions), and::

        reset_fn(seed_key, day uint32) -> (packed, env_state, key)   # episode key = fold_in(seed_key, day)
        step_fn(key, env_state, actions (N,) int32) -> (packed, env_state, key)
        packed = (obs (N, obs_dim), state (state_dim,), avail (N, n_actions) bool,
                  team_reward (), unit_alive (n_allies + n_enemies,) bool, step ())

    The first calls compile (several seconds): warm-up runs reset and a few steps, so that both
    step traces (on the state reset produced and on the one a step produced) exist before any
    training loop.
    """
    jax, jaxmarl, smax_env = _import_jaxmarl_smax()
    jnp = jax.numpy
    env = jaxmarl.make(
        "HeuristicEnemySMAX",
        scenario=smax_env.map_name_to_scenario(map_name),
        max_steps=max_steps,
        see_enemy_actions=False,
    )
    agents = list(env.agents)
    n_units = env.num_allies + env.num_enemies  # note: env.num_agents is the number of allies only
    n_feat = len(env.own_features)  # per-unit block of the world state
    n_types = len(env.unit_type_names)
    map_size = jnp.array([env.map_width, env.map_height], dtype=jnp.float32)
    type_cooldowns = jnp.asarray(env.unit_type_weapon_cooldowns, dtype=jnp.float32)

    def scale_world_state(ws):
        """World state -> mixer input in [0, 1] (see the section comment above)."""
        units = ws[: n_units * n_feat].reshape(n_units, n_feat)
        teams = ws[n_units * n_feat : n_units * n_feat + n_units]
        types = ws[n_units * n_feat + n_units :]
        units = units.at[:, 1:3].divide(map_size)
        cooldown = units[:, 3] / type_cooldowns[types.astype(jnp.int32)]
        units = units.at[:, 3].set(jnp.clip(cooldown, 0.0, 1.0))
        return jnp.concatenate([units.reshape(-1), teams, types / (n_types - 1)]).astype(jnp.float32)

    def pack(obs, env_state, team_reward):
        avail = env.get_avail_actions(env_state)
        return (
            jnp.stack([obs[a] for a in agents]).astype(jnp.float32),
            scale_world_state(obs["world_state"]),
            jnp.stack([avail[a] for a in agents]).astype(jnp.bool_),
            jnp.asarray(team_reward, dtype=jnp.float32),
            env_state.state.unit_alive,
            env_state.state.step,
        )

    def reset_fn(seed_key, day):
        key, reset_key = jax.random.split(jax.random.fold_in(seed_key, day))
        obs, env_state = env.reset(reset_key)
        return pack(obs, env_state, 0.0), env_state, key

    def step_fn(key, env_state, actions):
        key, step_key = jax.random.split(key)
        # step_env: the real transition. env.step would auto-reset on done and hand back the
        # first observation of the NEXT episode.
        obs, env_state, rewards, _, _ = env.step_env(step_key, env_state, {a: actions[i] for i, a in enumerate(agents)})
        return pack(obs, env_state, rewards[agents[0]]), env_state, key  # identical for every ally

    reset_fn, step_fn = jax.jit(reset_fn), jax.jit(step_fn)
    # Warm-up: compile reset and both step traces now, outside any training loop.
    stop = jnp.full((len(agents),), SMAX_NOOP_ACTION, dtype=jnp.int32)
    _, env_state, key = reset_fn(jax.random.PRNGKey(0), np.uint32(0))
    for _ in range(3):
        packed, env_state, key = step_fn(key, env_state, stop)
    jax.block_until_ready(packed)
    dims = (int(packed[0].shape[1]), int(packed[1].shape[0]), int(packed[2].shape[1]))
    return env, reset_fn, step_fn, dims


def smax_batch_chunk(n_units: int) -> int:
    """Episodes per vmapped SMAX call that give bit for bit the numbers of the single-episode step.

    XLA:CPU fuses the step's pairwise-unit reductions (tensors of B x U x U x 2 values, U units)
    differently once such a tensor reaches 4096 values, and the results then differ from the unbatched
    step's in the last bit (measured with jax 0.10.2: exact up to B = 31 for 3s_vs_5z's 8 units and up
    to B = 20 for 2s3z's 10 units, not at 32 / 21). Half that size, for a margin: 16 for 3s_vs_5z."""
    return max(1, 1024 // (n_units * n_units))


def _smax_stack(trees):
    """Stack pytrees of jax arrays (one per episode) along a new leading axis, as host-made (strongly typed) arrays."""
    import jax

    leaves = [jax.tree_util.tree_leaves(t) for t in jax.device_get(trees)]
    stacked = [jax.numpy.asarray(np.stack(column)) for column in zip(*leaves)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trees[0]), stacked)


@functools.cache
def _smax_batched(map_name: str, max_steps: int, chunk: int):
    """jax.vmap of _smax_compiled's jitted step over ``chunk`` episodes, compiled and warmed up once per process
    and (map, limit, chunk) (a few seconds):

        step_b(key (chunk, 2), env_state (leaves (chunk, ...)), actions (chunk, N) int32) -> (packed, env_state, key)

    Episodes start with the single-episode reset_fn, their states stacked by _smax_stack: the very numbers of
    reset(day), and host-made arrays carry no weak types, so step_b has one trace (the unbatched step has two)."""
    jax = _import_jaxmarl_smax()[0]
    env, reset_fn, step_fn, _ = _smax_compiled(map_name, max_steps)
    step_b = jax.jit(jax.vmap(step_fn))
    starts = [reset_fn(jax.random.PRNGKey(0), np.uint32(0))[1:] for _ in range(chunk)]
    env_state, key = _smax_stack([s for s, _ in starts]), _smax_stack([k for _, k in starts])
    stop = np.full((chunk, env.num_allies), SMAX_NOOP_ACTION, dtype=np.int32)
    for _ in range(2):
        packed, env_state, key = step_b(key, env_state, stop)
    jax.block_until_ready(packed)
    return step_b


def smax_enemy_feature_indices(env) -> np.ndarray:
    """(n_enemies, nf) observation indices of each enemy's feature block in a SMAX ally obs.

    JaxMARL's "unit_list" observation of an ally is ``[other allies | enemies | own features]``,
    one block of ``nf = len(env.unit_features)`` per other unit, allies first.
    """
    if getattr(env, "observation_type", "unit_list") != "unit_list":
        raise ValueError("enemy indices are defined for SMAX's 'unit_list' observations only")
    nf = len(env.unit_features)
    first_enemy = (env.num_allies - 1) * nf
    return first_enemy + nf * np.arange(env.num_enemies)[:, None] + np.arange(nf)[None, :]


def smax_enemy_position_indices(env) -> np.ndarray:
    """(n_enemies, 2) indices of enemy j's relative (x, y) in a SMAX ally observation.

    Within an enemy's block ``position_x``/``position_y`` hold its position relative to the
    observer divided by the observer's sight range (there is no separate distance feature).
    3s_vs_5z: blocks of 13 from index 26 -> (27, 28), (40, 41), (53, 54), (66, 67), (79, 80).
    """
    cols = [env.unit_features.index("position_x"), env.unit_features.index("position_y")]
    return smax_enemy_feature_indices(env)[:, cols]


class SMAXTask:
    """``--env smax``: JaxMARL HeuristicEnemySMAX behind the BuildingTask interface (numpy out)."""

    def __init__(self, map_name: str = STARCRAFT_DEFAULT_MAP, seed: int = 0, max_steps: int = 250):
        # Built (and compiled) once per process and map; raises EnvArgError without jaxmarl.
        self.env, self._reset_fn, self._step_fn, dims = _smax_compiled(map_name, max_steps)
        import jax

        self._jax = jax
        self.map_name = map_name
        self.label = f"SMAX {map_name}"  # never report these results as SMAC
        self.seed = int(seed)
        self._base_key = jax.random.PRNGKey(self.seed)
        self.n_agents = int(self.env.num_allies)
        self.n_enemies = int(self.env.num_enemies)
        self.obs_dim, self.state_dim, self.n_actions = dims  # 3s_vs_5z: 101, 96, 10
        self.episode_limit = int(max_steps)
        self.noop_action = SMAX_NOOP_ACTION
        self.enemy_feature_indices = smax_enemy_feature_indices(self.env)  # (n_enemies, 13)
        self.enemy_position_indices = smax_enemy_position_indices(self.env)  # (n_enemies, 2)
        self._env_state = None
        self._key = None
        self._avail = None
        self._done = True
        self._chunks = []  # reset_batch / step_batch

    def _unpack(self, packed):
        # One device->host transfer; jax hands back read-only buffers, so copy into numpy.
        obs, state, avail, reward, alive, step = self._jax.device_get(packed)
        obs = np.array(obs, dtype=np.float32, copy=True)
        state = np.array(state, dtype=np.float32, copy=True)
        avail = np.array(avail, dtype=bool, copy=True)
        alive = np.array(alive, dtype=bool, copy=True)
        self._avail = avail
        return obs, state, avail, float(reward), alive, int(step)

    def reset(self, day: int):
        """Start episode ``day`` of this seed (same seed and day -> same episode)."""
        packed, self._env_state, self._key = self._reset_fn(self._base_key, np.uint32(int(day) % 2**32))
        obs, state, avail, _, _, _ = self._unpack(packed)
        self._done = False
        return obs, state, avail

    def step(self, actions):
        if self._done:
            raise RuntimeError("the SMAX episode is over: call reset(day) first")
        actions = np.asarray(actions, dtype=np.int32).reshape(self.n_agents)
        ok = (actions >= 0) & (actions < self.n_actions)
        ok[ok] = self._avail[np.flatnonzero(ok), actions[ok]]
        if not ok.all():  # like SMAC's assertion: an algorithm must mask unavailable actions
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"agent {i} cannot perform action {int(actions[i])} (unavailable)")
        packed, self._env_state, self._key = self._step_fn(self._key, self._env_state, actions)
        obs, state, avail, reward, alive, t = self._unpack(packed)
        allies_alive, enemies_alive = alive[: self.n_agents], alive[self.n_agents :]
        battle_won = bool(not enemies_alive.any() and allies_alive.any())
        terminated = bool(not allies_alive.any() or not enemies_alive.any())
        truncated = bool(not terminated and t >= self.episode_limit)
        self._done = terminated or truncated
        info = {
            "battle_won": battle_won,
            "dead_allies": int((~allies_alive).sum()),
            "dead_enemies": int((~enemies_alive).sum()),
        }
        if truncated:
            info["episode_limit"] = True  # as SMAC reports a time-out
        return obs, state, avail, reward, terminated, truncated, info

    # Batched episodes (eval.py's lockstep evaluation rounds): reset_batch / step_batch run B
    # episodes of this seed side by side, stepped as one vmapped call per chunk of
    # smax_batch_chunk(units) episodes, each row exactly the numbers reset(day) / step() give.
    # Independent of reset() / step(): a training episode in progress is not disturbed.

    def reset_batch(self, days):
        """Start episodes ``days`` (B,) side by side -> obs (B, N, obs_dim), state (B, state_dim), avail (B, N, A)."""
        days = [int(d) % 2**32 for d in np.asarray(days).reshape(-1)]
        B = len(days)
        C = smax_batch_chunk(self.n_agents + self.n_enemies)
        self._step_b = _smax_batched(self.map_name, self.episode_limit, C)
        starts = [self._reset_fn(self._base_key, np.uint32(d)) for d in days + [days[-1]] * (-B % C)]  # pad rows: never live
        self._chunks = [
            [_smax_stack([s[1] for s in starts[c : c + C]]), _smax_stack([s[2] for s in starts[c : c + C]])]
            for c in range(0, len(starts), C)
        ]
        packed = self._jax.device_get([s[0] for s in starts[:B]])
        self._batch, self._chunk = B, C
        self._batch_alive = np.ones(B, dtype=bool)  # rows not yet ended
        self._batch_avail = np.stack([p[2] for p in packed]).astype(bool)
        return (
            np.stack([p[0] for p in packed]).astype(np.float32),
            np.stack([p[1] for p in packed]).astype(np.float32),
            self._batch_avail.copy(),
        )

    def step_batch(self, actions, live):
        """Step the rows ``live`` (B,) bool of the episodes of reset_batch with actions (B, N); a chunk
        without a live row is not stepped. -> obs, state, avail, reward (B,), terminated (B,), truncated (B,),
        battle_won (B,), as step() gives them row by row; rows not live hold meaningless values (reward 0,
        flags False). A row that is live after its episode ended raises RuntimeError, an unavailable action
        in a live row ValueError (as step() does)."""
        if not self._chunks:
            raise RuntimeError("call reset_batch(days) first")
        B, N = self._batch, self.n_agents
        live = np.asarray(live, dtype=bool).reshape(B)
        if (live & ~self._batch_alive).any():
            raise RuntimeError("a SMAX episode of the batch is over: it cannot be stepped")
        actions = np.asarray(actions, dtype=np.int32).reshape(B, N).copy()
        actions[~live] = self.noop_action  # always available (the stop action)
        ok = (actions >= 0) & (actions < self.n_actions)
        rows, agents = np.nonzero(ok)
        ok[rows, agents] = self._batch_avail[rows, agents, actions[rows, agents]]
        ok |= ~live[:, None]
        if not ok.all():
            e, i = (int(v[0]) for v in np.nonzero(~ok))
            raise ValueError(f"episode {e} of the batch: agent {i} cannot perform action {int(actions[e, i])} (unavailable)")
        C = self._chunk
        padded = np.concatenate([actions, np.full((-B % C, N), self.noop_action, dtype=np.int32)])
        live_padded = np.concatenate([live, np.zeros(-B % C, dtype=bool)])
        obs = np.zeros((B, N, self.obs_dim), dtype=np.float32)
        state = np.zeros((B, self.state_dim), dtype=np.float32)
        avail = self._batch_avail.copy()
        reward = np.zeros(B, dtype=np.float32)
        alive = np.ones((B, N + self.n_enemies), dtype=bool)
        t = np.zeros(B, dtype=np.int64)
        for j, chunk in enumerate(self._chunks):
            lo, hi = j * C, min((j + 1) * C, B)
            if not live_padded[j * C : (j + 1) * C].any():
                continue
            packed, chunk[0], chunk[1] = self._step_b(chunk[1], chunk[0], padded[j * C : (j + 1) * C])
            o, s, av, r, al, st = self._jax.device_get(packed)
            obs[lo:hi], state[lo:hi], avail[lo:hi] = o[: hi - lo], s[: hi - lo], av[: hi - lo]
            reward[lo:hi], alive[lo:hi], t[lo:hi] = r[: hi - lo], al[: hi - lo], st[: hi - lo]
        allies_alive, enemies_alive = alive[:, :N].any(1), alive[:, N:].any(1)
        battle_won = live & ~enemies_alive & allies_alive
        terminated = live & (~allies_alive | ~enemies_alive)
        truncated = live & ~terminated & (t >= self.episode_limit)
        reward[~live] = 0.0
        self._batch_avail[live] = avail[live]
        self._batch_alive &= ~(terminated | truncated)
        return obs, state, avail, reward, terminated, truncated, battle_won

    def close(self):
        pass


# ------------------------------------------- SMAC --------------------------------------------


def _parse_smac_config(config: str, flag: str) -> tuple[str | None, str]:
    """``[smacv1:|smacv2:]MAP`` -> (backend or None for auto, map name)."""
    backend, sep, map_name = config.partition(":")
    if not sep:
        return None, config
    if backend not in SMAC_BACKENDS:
        raise EnvArgError(f"{flag} '{config}': unknown SMAC backend prefix '{backend}'; use MAP, smacv1:MAP or smacv2:MAP")
    return backend, map_name


def _import_smac_backend(backend: str | None):
    """Return (backend name, the ``<pkg>.env`` module) or raise EnvArgError with what to install."""
    if backend is None:  # auto: SMAC v1 (faithful for the original maps) first, then smacv2
        try:
            return _import_smac_backend("smacv1")
        except EnvArgError as v1_error:
            if importlib.util.find_spec("smacv2") is None:
                raise v1_error from None
            warnings.warn(
                f"SMAC v1 is not usable ({v1_error}); falling back to smacv2, which does not support the "
                "original SMAC maps faithfully (see docs/starcraft.md)",
                stacklevel=2,
            )
            return _import_smac_backend("smacv2")
    package = SMAC_BACKENDS[backend]
    install = SMAC_INSTALL if backend == "smacv1" else SMACV2_INSTALL
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise EnvArgError(f"--env smac needs SMAC ({package} is not installed): {install}, then {SC2_INSTALL}")
    locations = list(spec.submodule_search_locations or [])
    if backend == "smacv1" and not any(os.path.isdir(os.path.join(p, "env")) for p in locations):
        # PyPI's `smac` is SMAC3 (hyperparameter optimisation): same import name, no smac.env.
        raise EnvArgError(
            "--env smac: the installed 'smac' package is SMAC3 (hyperparameter optimisation, PyPI), not the "
            f"StarCraft Multi-Agent Challenge; run: pip uninstall -y smac && {install}"
        )
    try:
        module = importlib.import_module(f"{package}.env")
    except ImportError as err:
        raise EnvArgError(f"--env smac: importing {package}.env failed ({err}); run: {install}") from None
    if not hasattr(module, "StarCraft2Env"):
        raise EnvArgError(f"--env smac: {package}.env has no StarCraft2Env; run: {install}")
    return backend, module


def _smac_map_names(backend: str) -> tuple[str, ...]:
    maps = importlib.import_module(f"{SMAC_BACKENDS[backend]}.env.starcraft2.maps.smac_maps")
    return tuple(maps.get_smac_map_registry())


def sc2_path() -> str:
    """StarCraft II install folder: $SC2PATH, default ~/StarCraftII (as pysc2 resolves it)."""
    return os.environ.get("SC2PATH") or os.path.expanduser("~/StarCraftII")


def _check_sc2_install(map_name: str, backend: str) -> None:
    root = sc2_path()
    if not os.path.isdir(os.path.join(root, "Versions")):
        raise EnvArgError(f"--env smac: no StarCraft II at {root} (no Versions folder); {SC2_INSTALL}")
    maps_dir = os.path.join(root, "Maps", "SMAC_Maps")
    if not os.path.isdir(maps_dir):
        raise EnvArgError(f"--env smac: no SMAC maps folder {maps_dir}; {SC2_INSTALL}")
    # SMAC v1 map files are named after the map; smacv2's scenarios share generic map files.
    if backend == "smacv1" and not os.path.isfile(os.path.join(maps_dir, f"{map_name}.SC2Map")):
        raise EnvArgError(f"--env smac: map file {map_name}.SC2Map is missing from {maps_dir}; {SC2_INSTALL}")


def _check_starcraft_config(env_id: str, config: str, flag: str) -> None:
    """Validate a StarCraft map name and that its backend (package, game) is usable here."""
    if env_id == "smax":
        _, _, smax_env = _import_jaxmarl_smax()
        known = tuple(smax_env.MAP_NAME_TO_SCENARIO)
        if config not in known:
            raise EnvArgError(f"{flag} '{config}' is not a SMAX scenario; accepted: {', '.join(known)}")
        return
    backend, map_name = _parse_smac_config(config, flag)
    backend, _ = _import_smac_backend(backend)
    known = _smac_map_names(backend)
    if map_name not in known:
        raise EnvArgError(f"{flag} '{config}' is not a map of {backend}; e.g. {STARCRAFT_DEFAULT_MAP}")
    _check_sc2_install(map_name, backend)


def enemy_feature_indices_smac(env_like) -> np.ndarray:
    """(n_enemies, nf) observation indices of each enemy's feature block in a SMAC agent obs.

    Works on anything exposing SMAC's ``get_obs_move_feats_size()`` and
    ``get_obs_enemy_feats_size() -> (n_enemies, nf)``: the observation starts with the move
    features, then one block of ``nf`` per enemy.
    """
    move = int(env_like.get_obs_move_feats_size())
    n_enemies, nf = (int(v) for v in env_like.get_obs_enemy_feats_size())
    return move + nf * np.arange(n_enemies)[:, None] + np.arange(nf)[None, :]


def enemy_position_indices_smac(env_like) -> np.ndarray:
    """(n_enemies, 2) indices of enemy e's (rel_x, rel_y) in a SMAC/smacv2 agent observation.

    An enemy block is [shootable, distance, rel_x, rel_y, (health, shield, unit type bits)], so
    rel_x/rel_y sit at ``move + e*nf + 2`` and ``+ 3``.
    3s_vs_5z: move 4, nf 6 -> (6, 7), (12, 13), (18, 19), (24, 25), (30, 31).
    """
    return enemy_feature_indices_smac(env_like)[:, 2:4]


class SMACTask:
    """``--env smac``: SMAC / smacv2 ``StarCraft2Env`` behind the BuildingTask interface."""

    def __init__(self, map_name: str = STARCRAFT_DEFAULT_MAP, seed: int = 0, backend: str | None = None):
        self.backend, module = _import_smac_backend(backend)
        try:
            from absl import flags  # pysc2 reads absl flags when it launches the game
        except ImportError:  # pragma: no cover - pysc2 depends on absl-py
            flags = None
        if flags is not None and not flags.FLAGS.is_parsed():
            flags.FLAGS(sys.argv[:1])  # pysc2's defaults only, never this script's own arguments
        self.map_name = map_name
        self.label = f"SMAC {map_name}" if self.backend == "smacv1" else f"smacv2 {map_name}"
        self.env = module.StarCraft2Env(map_name=map_name, seed=int(seed))
        info = self.env.get_env_info()
        self.n_agents = int(info["n_agents"])
        self.n_actions = int(info["n_actions"])
        self.obs_dim = int(info["obs_shape"])
        self.state_dim = int(info["state_shape"])
        self.episode_limit = int(info["episode_limit"])
        self.noop_action = 0  # SMAC: a dead agent can only take no-op (action 0)
        self.enemy_feature_indices = enemy_feature_indices_smac(self.env)  # (n_enemies, nf)
        self.enemy_position_indices = enemy_position_indices_smac(self.env)  # (n_enemies, 2)

    def _observe(self):
        obs = np.array(self.env.get_obs(), dtype=np.float32).reshape(self.n_agents, self.obs_dim)
        state = np.array(self.env.get_state(), dtype=np.float32).reshape(self.state_dim)
        avail = np.array(self.env.get_avail_actions(), dtype=bool).reshape(self.n_agents, self.n_actions)
        return obs, state, avail

    def reset(self, day: int):
        """New episode. ``day`` is ignored: SC2 is seeded once from ``seed`` at construction."""
        self.env.reset()
        return self._observe()

    def step(self, actions):
        actions = np.asarray(actions).reshape(self.n_agents)
        reward, terminated, info = self.env.step([int(a) for a in actions])
        info = dict(info)
        # SMAC ends a timed-out episode with terminated=True and info["episode_limit"]=True: that
        # is a time limit (bootstrap), not a true terminal state.
        truncated = bool(info.get("episode_limit", False))
        terminated = bool(terminated) and not truncated
        info["battle_won"] = bool(info.get("battle_won", False))
        obs, state, avail = self._observe()
        return obs, state, avail, float(reward), terminated, truncated, info

    def close(self):
        self.env.close()


def _make_starcraft(env_id: str, config: str, seed: int):
    if env_id == "smax":
        return SMAXTask(config, seed=seed)
    backend, map_name = _parse_smac_config(config, "--train-config")
    return SMACTask(map_name, seed=seed, backend=backend)


# ------------------------------------ observation noise --------------------------------------


class ObservationNoise:
    """Test-time shift of paper Sec. 5.2: N(0, sigma^2) on every enemy's relative (x, y).

    Wraps any task exposing ``enemy_position_indices`` ((n_enemies, 2) observation indices) and
    perturbs the observations returned by ``reset`` and ``step``, for every agent and every enemy;
    state, action masks, rewards and infos pass through untouched. The noise of episode ``day``
    comes from ``np.random.default_rng((seed, day))``, so an evaluation is reproducible episode by
    episode whatever order it runs in. ``sigma=0`` gives the clean observations.

    ``only_visible=True`` perturbs only enemies whose feature block (``env.enemy_feature_indices``)
    is not all zero, i.e. enemies in sight and alive; the default perturbs every enemy, as the
    paper states it (an enemy out of sight then shows a noisy position with zero health).
    """

    def __init__(self, env, sigma: float = 0.75, seed: int = 0, only_visible: bool = False):
        if sigma < 0:
            raise ValueError("sigma must be >= 0")
        self.env = env
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.only_visible = bool(only_visible)
        self.enemy_position_indices = np.asarray(env.enemy_position_indices)
        self._flat = self.enemy_position_indices.reshape(-1)
        self.rng = np.random.default_rng(self.seed)

    def __getattr__(self, name):  # n_agents, n_actions, obs_dim, ... come from the wrapped task
        if name == "env":  # not yet set (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.env, name)

    def _enemy_visible(self, obs: np.ndarray) -> np.ndarray:
        """(N, n_enemies) True where an enemy's whole feature block is not all zero."""
        blocks = np.asarray(self.env.enemy_feature_indices)  # (n_enemies, features per enemy)
        return np.abs(obs[:, blocks]).sum(axis=-1) > 0

    def perturb(self, obs: np.ndarray) -> np.ndarray:
        obs = np.array(obs, dtype=np.float32, copy=True)
        if self.sigma == 0:
            return obs
        noise = self.rng.normal(0.0, self.sigma, size=(obs.shape[0], self._flat.size)).astype(np.float32)
        if self.only_visible:
            visible = self._enemy_visible(obs)  # (N, n_enemies)
            noise *= np.repeat(visible, 2, axis=1)
        obs[:, self._flat] += noise
        return obs

    def reset(self, day: int):
        self.rng = np.random.default_rng((self.seed, int(day)))
        obs, state, avail = self.env.reset(day)
        return self.perturb(obs), state, avail

    def step(self, actions):
        obs, state, avail, reward, terminated, truncated, info = self.env.step(actions)
        return self.perturb(obs), state, avail, reward, terminated, truncated, info
