"""StarCraft task adapters in envs.py: SMAX (JaxMARL), SMAC/smacv2, and the observation noise.

SMAX tests skip when jaxmarl is not installed; tests of the real SMAC skip without the package
or without StarCraft II under $SC2PATH. The SMAC adapter's own logic (config parsing, install
checks, time-out -> truncated, noise indices) is tested against stub packages written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import SUBPROCESS_TIMEOUT

import envs

HAS_JAXMARL = importlib.util.find_spec("jaxmarl") is not None
needs_jaxmarl = pytest.mark.skipif(not HAS_JAXMARL, reason="jaxmarl not installed (pip install -r requirements.txt)")

SMAC_3S_VS_5Z_POS = [[6, 7], [12, 13], [18, 19], [24, 25], [30, 31]]
SMAX_3S_VS_5Z_POS = [[27, 28], [40, 41], [53, 54], [66, 67], [79, 80]]


# ----------------------------------------- stubs ---------------------------------------------


class StubSMACLayout:
    """Exposes SMAC's feature-size methods as StarCraft2Env('3s_vs_5z') reports them."""

    def get_obs_move_feats_size(self):
        return 4  # 4 movement-availability bits (no pathing grid)

    def get_obs_enemy_feats_size(self):
        return 5, 6  # 5 zealots x [shootable, distance, rel_x, rel_y, health, shield]


class StubTask:
    """A task with the common interface and a SMAC 3s_vs_5z observation layout."""

    n_agents, n_actions, obs_dim, state_dim, episode_limit = 3, 11, 48, 68, 250

    def __init__(self):
        self.enemy_feature_indices = envs.enemy_feature_indices_smac(StubSMACLayout())
        self.enemy_position_indices = envs.enemy_position_indices_smac(StubSMACLayout())
        self.t = 0

    def _out(self):
        rng = np.random.default_rng(self.t)
        obs = rng.uniform(-1, 1, size=(self.n_agents, self.obs_dim)).astype(np.float32)
        obs[:, self.enemy_feature_indices[4]] = 0.0  # enemy 4 out of sight: its block is blank
        state = rng.uniform(0, 1, size=self.state_dim).astype(np.float32)
        avail = rng.uniform(size=(self.n_agents, self.n_actions)) > 0.3
        return obs, state, avail

    def reset(self, day):
        self.t = 1000 * int(day)
        return self._out()

    def step(self, actions):
        self.t += 1
        obs, state, avail = self._out()
        return obs, state, avail, 0.5, False, False, {"battle_won": False}


# ------------------------------------- noise (stubs) -----------------------------------------


def test_smac_enemy_position_indices_from_feature_sizes():
    idx = envs.enemy_position_indices_smac(StubSMACLayout())
    assert idx.tolist() == SMAC_3S_VS_5Z_POS
    blocks = envs.enemy_feature_indices_smac(StubSMACLayout())
    assert blocks.shape == (5, 6) and blocks[0].tolist() == [4, 5, 6, 7, 8, 9]


def test_noise_only_at_enemy_positions_and_reproducible():
    clean, noisy = StubTask(), envs.ObservationNoise(StubTask(), sigma=0.75, seed=3)
    assert noisy.n_agents == 3 and noisy.obs_dim == 48  # attributes pass through
    flat = np.array(SMAC_3S_VS_5Z_POS).reshape(-1)
    others = np.setdiff1d(np.arange(48), flat)

    o0, s0, a0 = clean.reset(2)
    o1, s1, a1 = noisy.reset(2)
    diff = o1 - o0
    assert np.all(diff[:, others] == 0) and np.all(diff[:, flat] != 0)
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(a0, a1)
    out0, out1 = clean.step([0, 0, 0]), noisy.step([0, 0, 0])
    assert np.all((out1[0] - out0[0])[:, others] == 0) and np.all(out1[0][:, flat] != out0[0][:, flat])
    np.testing.assert_array_equal(out0[1], out1[1])  # state
    np.testing.assert_array_equal(out0[2], out1[2])  # avail
    assert out0[3:] == out1[3:]  # reward, terminated, truncated, info

    again = envs.ObservationNoise(StubTask(), sigma=0.75, seed=3)
    np.testing.assert_array_equal(again.reset(2)[0], o1)  # same seed + episode -> same noise
    other = envs.ObservationNoise(StubTask(), sigma=0.75, seed=4)
    assert not np.array_equal(other.reset(2)[0], o1)
    noise_day3 = noisy.reset(3)[0] - StubTask().reset(3)[0]
    assert not np.array_equal(noise_day3[:, flat], diff[:, flat])  # a new episode draws new noise


def test_noise_statistics_and_noise_off():
    task = envs.ObservationNoise(StubTask(), sigma=0.75, seed=0)
    draws = np.concatenate(
        [task.perturb(np.zeros((3, 48), np.float32))[:, task.enemy_position_indices.ravel()] for _ in range(400)]
    )
    assert abs(draws.mean()) < 0.03 and abs(draws.std() - 0.75) < 0.03
    off = envs.ObservationNoise(StubTask(), sigma=0.0, seed=0)
    np.testing.assert_array_equal(off.reset(1)[0], StubTask().reset(1)[0])


def test_noise_only_visible_skips_blank_enemy_blocks():
    task = envs.ObservationNoise(StubTask(), sigma=0.75, seed=0, only_visible=True)
    obs, _, _ = task.reset(0)
    clean, _, _ = StubTask().reset(0)
    assert np.all(obs[:, [30, 31]] == 0)  # enemy 4 is blank -> left clean
    assert np.all(obs[:, [6, 7, 24, 25]] != clean[:, [6, 7, 24, 25]])


# ------------------------------ SMAC adapter against stub packages ----------------------------

FAKE_STARCRAFT2ENV = '''
import numpy as np


class StarCraft2Env:
    """Stub with SMAC's API and 3s_vs_5z sizes; scripted step outcomes."""

    script = []  # (reward, terminated, info) returned by successive step() calls

    def __init__(self, map_name="8m", seed=None, **kwargs):
        self.map_name, self.seed, self.steps = map_name, seed, 0

    def get_env_info(self):
        return {"n_agents": 3, "n_actions": 11, "obs_shape": 48, "state_shape": 68, "episode_limit": 250}

    def get_obs_move_feats_size(self):
        return 4

    def get_obs_enemy_feats_size(self):
        return 5, 6

    def reset(self):
        self.steps = 0
        return self.get_obs(), self.get_state()

    def get_obs(self):
        return [np.full(48, i + self.steps, dtype=np.float32) for i in range(3)]

    def get_state(self):
        return np.zeros(68, dtype=np.float32)

    def get_avail_actions(self):
        return [[1] * 11 for _ in range(3)]

    def step(self, actions):
        out = type(self).script[self.steps]
        self.steps += 1
        return out

    def close(self):
        pass
'''


@pytest.fixture
def fake_smac(tmp_path, monkeypatch):
    """A stub `smac` package (SMAC v1 layout) first on sys.path; yields a builder for variants."""
    for name in [m for m in sys.modules if m == "smac" or m.startswith("smac.")]:
        monkeypatch.delitem(sys.modules, name)

    def build(kind: str) -> Path:
        pkg = tmp_path / kind / "smac"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("version = '2.0.0'\n" if kind == "smac3" else "")
        if kind == "smacv1":
            (pkg / "env" / "starcraft2" / "maps").mkdir(parents=True)
            (pkg / "env" / "__init__.py").write_text(FAKE_STARCRAFT2ENV)
            (pkg / "env" / "starcraft2" / "__init__.py").write_text("")
            (pkg / "env" / "starcraft2" / "maps" / "__init__.py").write_text("")
            (pkg / "env" / "starcraft2" / "maps" / "smac_maps.py").write_text(
                "def get_smac_map_registry():\n    return {'3m': {}, '3s_vs_5z': {}}\n"
            )
        monkeypatch.syspath_prepend(str(tmp_path / kind))
        return pkg

    yield build
    for name in [m for m in sys.modules if m == "smac" or m.startswith("smac.")]:
        sys.modules.pop(name, None)


def _sc2_tree(root: Path, with_map: bool = True) -> Path:
    (root / "Versions").mkdir(parents=True)
    (root / "Maps" / "SMAC_Maps").mkdir(parents=True)
    if with_map:
        (root / "Maps" / "SMAC_Maps" / "3s_vs_5z.SC2Map").write_bytes(b"")
    return root


def _one_line_error(env_id, config, flag="--train-config"):
    with pytest.raises(envs.EnvArgError) as err:
        envs.check_env_args(env_id, config, flag)
    message = str(err.value)
    assert "\n" not in message and message
    return message


@pytest.mark.skipif(
    importlib.util.find_spec("smac") is not None or importlib.util.find_spec("smacv2") is not None,
    reason="a smac/smacv2 package is installed",
)
def test_smac_without_package_says_what_to_install():
    message = _one_line_error("smac", "3s_vs_5z")
    assert "install" in message and "github.com/oxwhirl/smac" in message
    assert "StarCraft II 4.10" in message and "SMAC_Maps" in message and "SC2PATH" in message


def test_smac_detects_the_unrelated_smac3_package(fake_smac):
    fake_smac("smac3")
    message = _one_line_error("smac", "3s_vs_5z")
    assert "SMAC3" in message and "pip uninstall" in message and "oxwhirl/smac" in message


def test_smac_config_errors(fake_smac, tmp_path, monkeypatch):
    fake_smac("smacv1")
    monkeypatch.setenv("SC2PATH", str(_sc2_tree(tmp_path / "SC2")))
    assert "--train-config" in _one_line_error("smac", "3s_vs_55z")
    assert "--test-config" in _one_line_error("smac", "nope", flag="--test-config")
    assert "backend prefix" in _one_line_error("smac", "smacv3:3s_vs_5z")
    envs.check_env_args("smac", "3s_vs_5z")  # passes with the package and the game in place
    envs.check_env_args("smac", "smacv1:3s_vs_5z")


def test_smac_needs_the_game_under_sc2path(fake_smac, tmp_path, monkeypatch):
    fake_smac("smacv1")
    monkeypatch.setenv("SC2PATH", str(tmp_path / "nowhere"))
    message = _one_line_error("smac", "3s_vs_5z")
    assert "Versions" in message and "StarCraft II 4.10" in message and "SMAC_Maps" in message
    monkeypatch.setenv("SC2PATH", str(_sc2_tree(tmp_path / "SC2", with_map=False)))
    assert "3s_vs_5z.SC2Map" in _one_line_error("smac", "3s_vs_5z")


def test_smac_task_maps_smac_step_to_the_common_interface(fake_smac, tmp_path, monkeypatch):
    fake_smac("smacv1")
    monkeypatch.setenv("SC2PATH", str(_sc2_tree(tmp_path / "SC2")))
    task = envs.make_env("smac", "3s_vs_5z", seed=7)
    assert isinstance(task, envs.SMACTask) and task.backend == "smacv1" and task.label == "SMAC 3s_vs_5z"
    assert (task.n_agents, task.n_actions, task.obs_dim, task.state_dim, task.episode_limit) == (3, 11, 48, 68, 250)
    assert task.enemy_position_indices.tolist() == SMAC_3S_VS_5Z_POS
    assert task.env.seed == 7
    stub = type(task.env)
    stub.script = [
        (0.1, False, {"battle_won": False}),
        (0.2, True, {"battle_won": False, "episode_limit": True}),  # SMAC's time-out
        (0.3, True, {"battle_won": True}),  # a real terminal: won
    ]
    obs, state, avail = task.reset(0)
    assert obs.shape == (3, 48) and obs.dtype == np.float32 and state.shape == (68,) and avail.dtype == bool
    out = task.step([1, 1, 1])
    assert out[3:6] == (0.1, False, False) and out[6]["battle_won"] is False
    out = task.step([1, 1, 1])
    assert out[4] is False and out[5] is True and out[6]["battle_won"] is False  # time-out = truncated
    out = task.step([1, 1, 1])
    assert out[4] is True and out[5] is False and out[6]["battle_won"] is True


def test_smax_without_jaxmarl_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jaxmarl", None)  # makes `import jaxmarl` fail
    message = _one_line_error("smax", "3s_vs_5z")
    assert "jaxmarl" in message and "pip install -r requirements.txt" in message


# --------------------------------- real SMAC (needs the game) ---------------------------------


def _sc2_available() -> bool:
    return os.path.isdir(os.path.join(envs.sc2_path(), "Versions"))


@pytest.mark.skipif(not _sc2_available(), reason="no StarCraft II under $SC2PATH")
def test_real_smac_3s_vs_5z_episode():
    pytest.importorskip("smac.env")  # also skips when `smac` is SMAC3
    task = envs.make_env("smac", "smacv1:3s_vs_5z", seed=0)
    try:
        assert (task.n_agents, task.n_actions, task.obs_dim, task.state_dim) == (3, 11, 48, 68)
        assert task.enemy_position_indices.tolist() == SMAC_3S_VS_5Z_POS
        rng = np.random.default_rng(0)
        _obs, _state, avail = task.reset(0)
        for _ in range(task.episode_limit):
            actions = [rng.choice(np.flatnonzero(a)) for a in avail]
            _obs, _state, avail, _reward, terminated, truncated, info = task.step(actions)
            if terminated or truncated:
                break
        assert terminated or truncated and not (terminated and truncated)
        assert "battle_won" in info
    finally:
        task.close()


# ------------------------------------------ SMAX ----------------------------------------------

DIRS = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]], dtype=float)  # SMAX actions 0-3: N, E, S, W


def kite_policy(task, obs, avail, safe=0.5, centre_weight=3.0):
    """Scripted kiting for SMAX 3s_vs_5z: shoot when ready, else back off from close zealots."""
    actions = np.full(task.n_agents, task.noop_action)
    for i in range(task.n_agents):
        if not avail[i, :4].any():
            continue  # dead
        own = obs[i, -10:]  # health, x / 32, y / 32, cooldown fraction, unit-type bits
        rel = obs[i, task.enemy_position_indices]
        seen = np.abs(obs[i, task.enemy_feature_indices]).sum(-1) > 0
        in_range = np.flatnonzero(avail[i, 5:])
        dist = np.where(seen, np.linalg.norm(rel, axis=1), np.inf)
        if own[3] <= 0.0 and in_range.size:
            health = obs[i, task.enemy_feature_indices[in_range, 0]]
            actions[i] = 5 + in_range[np.argmin(health + 1e-3 * in_range)]
        elif seen.any() and dist.min() < safe:
            away = -rel[np.argmin(dist)] / (dist.min() + 1e-8)
            actions[i] = int(np.argmax(DIRS @ away + centre_weight * (DIRS @ (0.5 - own[1:3]))))
        elif not seen.any():
            actions[i] = 1  # walk east, towards the zealots
    return actions


@pytest.fixture(scope="module")
def smax():
    if not HAS_JAXMARL:
        pytest.skip("jaxmarl not installed (pip install -r requirements.txt)")
    return envs.make_env("smax", seed=0)


def _set_raw(task, **fields):
    """Overwrite fields of the underlying SMAX state (test-only access to the adapter)."""
    import jax.numpy as jnp

    raw = task._env_state.state
    fields = {k: jnp.asarray(v, dtype=getattr(raw, k).dtype) for k, v in fields.items()}
    task._env_state = task._env_state.replace(state=raw.replace(**fields))


@needs_jaxmarl
def test_smax_interface_and_sizes(smax):
    assert isinstance(smax, envs.SMAXTask) and smax.label == "SMAX 3s_vs_5z"
    assert (smax.n_agents, smax.n_actions, smax.obs_dim, smax.state_dim, smax.episode_limit) == (3, 10, 101, 96, 250)
    obs, state, avail = smax.reset(0)
    assert obs.shape == (3, 101) and obs.dtype == np.float32 and obs.flags.writeable
    assert state.shape == (96,) and state.dtype == np.float32 and state.flags.writeable
    assert avail.shape == (3, 10) and avail.dtype == bool and avail.flags.writeable
    assert state.min() >= 0.0 and state.max() <= 1.0  # positions scaled from 0-32
    assert avail[:, :5].all() and not avail[:, 5:].any()  # zealots out of range at the start


@needs_jaxmarl
def test_smax_enemy_position_indices_match_the_layout(smax):
    assert smax.enemy_position_indices.tolist() == SMAX_3S_VS_5Z_POS
    # Semantics: walk east until ally 0 sees a zealot, then compare with the simulator's positions.
    smax.reset(1)
    for _ in range(20):
        obs, *_ = smax.step([1, 1, 1])
        seen = np.abs(obs[0, smax.enemy_feature_indices]).sum(-1) > 0
        if seen.any():
            break
    assert seen.any()
    raw = smax._env_state.state
    pos = np.asarray(raw.unit_positions)
    sight = float(smax.env.unit_type_sight_ranges[int(raw.unit_types[0])])
    for j in np.flatnonzero(seen):
        expected = (pos[3 + j] - pos[0]) / sight
        np.testing.assert_allclose(obs[0, smax.enemy_position_indices[j]], expected, atol=1e-5)


@needs_jaxmarl
def test_smax_reset_is_reproducible_per_seed_and_day(smax):
    a = smax.reset(5)
    traj_a = [smax.step([1, 0, 3])[:4] for _ in range(5)]
    b = smax.reset(5)
    traj_b = [smax.step([1, 0, 3])[:4] for _ in range(5)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(traj_a, traj_b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(smax.reset(6)[1], a[1])
    assert not np.array_equal(envs.SMAXTask("3s_vs_5z", seed=1).reset(5)[1], a[1])


@needs_jaxmarl
def test_smax_episode_ends_without_auto_reset_and_dead_agents_only_stop(smax):
    first_state = smax.reset(2)[1]
    avail_seen = []
    for t in range(1, 251):
        obs, state, avail, _reward, terminated, truncated, info = smax.step([smax.noop_action] * 3)
        health = state[: 8 * 10].reshape(8, 10)[:, 0]
        for i in range(3):
            if health[i] == 0:  # dead: only the stop action
                assert avail[i].tolist() == [False] * 4 + [True] + [False] * 5
                assert not obs[i].any()
            else:
                assert avail[i, :5].all()
        avail_seen.append(avail)
        if terminated or truncated:
            break
    assert terminated != truncated and t <= smax.episode_limit
    # The last transition belongs to this episode: the simulator state was not reset.
    raw = smax._env_state.state
    assert int(raw.step) == t and not np.array_equal(state, first_state)
    np.testing.assert_array_equal(np.asarray(raw.unit_alive), health > 0)
    assert info["battle_won"] == bool(health[:3].any() and not health[3:].any())
    with pytest.raises(RuntimeError):
        smax.step([smax.noop_action] * 3)


@needs_jaxmarl
def test_smax_terminal_cases_from_unit_liveness(smax):
    stop = [smax.noop_action] * 3
    smax.reset(0)  # all enemies dead, allies alive -> won
    _set_raw(smax, unit_health=np.r_[np.full(3, 160.0), np.zeros(5)])
    out = smax.step(stop)
    assert (out[4], out[5], out[6]["battle_won"]) == (True, False, True)
    assert out[3] == pytest.approx(1.0)  # the win bonus (health was already 0 before the step)

    smax.reset(0)  # all allies dead -> lost
    _set_raw(smax, unit_health=np.r_[np.zeros(3), np.full(5, 150.0)])
    out = smax.step(stop)
    assert (out[4], out[5], out[6]["battle_won"]) == (True, False, False)

    smax.reset(0)  # everybody dead in the same step -> draw, not a win
    _set_raw(smax, unit_health=np.zeros(8))
    out = smax.step(stop)
    assert (out[4], out[5], out[6]["battle_won"]) == (True, False, False)

    smax.reset(0)  # the 250-step limit with units alive -> truncated, not terminated
    _set_raw(smax, step=smax.episode_limit - 1)
    out = smax.step(stop)
    assert (out[4], out[5], out[6]["battle_won"], out[6]["episode_limit"]) == (False, True, False, True)


@needs_jaxmarl
def test_smax_scripted_kiting_wins_and_battle_won_matches_liveness(smax):
    wins = 0
    for day in range(6):
        obs, _state, avail = smax.reset(100 + day)
        for _ in range(smax.episode_limit):
            obs, _state, avail, _reward, terminated, truncated, info = smax.step(kite_policy(smax, obs, avail))
            if terminated or truncated:
                break
        alive = np.asarray(smax._env_state.state.unit_alive)
        assert info["battle_won"] == bool(alive[:3].any() and not alive[3:].any())
        wins += info["battle_won"]
    assert wins >= 1


@needs_jaxmarl
def test_smax_rejects_unavailable_actions(smax):
    smax.reset(0)
    with pytest.raises(ValueError, match="cannot perform"):
        smax.step([5, 4, 4])  # attack out of range
    with pytest.raises(ValueError):
        smax.step([10, 4, 4])


@needs_jaxmarl
def test_smax_observation_noise(smax):
    clean_obs, clean_state, clean_avail = smax.reset(3)
    noisy = envs.ObservationNoise(smax, sigma=0.75, seed=11)
    obs, state, avail = noisy.reset(3)
    flat = np.array(SMAX_3S_VS_5Z_POS).ravel()
    others = np.setdiff1d(np.arange(101), flat)
    np.testing.assert_array_equal(obs[:, others], clean_obs[:, others])
    assert np.all(obs[:, flat] != clean_obs[:, flat])
    np.testing.assert_array_equal(state, clean_state)
    np.testing.assert_array_equal(avail, clean_avail)
    step_noisy = noisy.step([1, 1, 1])
    again = envs.ObservationNoise(smax, sigma=0.75, seed=11)
    np.testing.assert_array_equal(again.reset(3)[0], obs)
    step_again = again.step([1, 1, 1])
    np.testing.assert_array_equal(step_again[0], step_noisy[0])
    np.testing.assert_array_equal(envs.ObservationNoise(smax, sigma=0.0).reset(3)[0], clean_obs)


@needs_jaxmarl
def test_smax_no_compilation_after_construction(smax):
    import jax

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            smax.reset(7)
            for _ in range(5):
                smax.step([1, 1, 1])
            envs.SMAXTask("3s_vs_5z", seed=0).reset(8)  # a second task reuses the cached functions
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert not [m for m in messages if m.startswith("Compiling")]


@needs_jaxmarl
def test_smax_config_errors_and_build_log():
    message = _one_line_error("smax", "3s_vs_5zz")
    assert "--train-config" in message and "3s_vs_5z" in message
    envs.check_env_args("smax", "3s_vs_5z")
    assert envs.default_config("smax") == "3s_vs_5z"
    envs.make_env("smax", seed=0)
    assert envs.BUILD_LOG[-1] == ("smax", "3s_vs_5z")


@needs_jaxmarl
def test_jaxmarl_import_keeps_stdout_redirection():
    """jaxmarl 0.2.0 resets sys.stdout/sys.stderr on import; the adapter must undo that."""
    code = textwrap.dedent(
        """
        import io, sys
        buf, err = io.StringIO(), io.StringIO()
        sys.stdout, sys.stderr = buf, err
        import envs
        envs._import_jaxmarl_smax()
        kept = sys.stdout is buf and sys.stderr is err
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        print(kept, repr(buf.getvalue()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True ''"
