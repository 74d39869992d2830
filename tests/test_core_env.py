"""envs.py building adapter, checked against the raw sustaingym MultiAgentBuildingEnv.

Every expected value comes from the raw simulator (built from the same ParameterGenerator
output) or from the paper (Eq. 31, Table 3), never from the adapter itself.
"""

import numpy as np
import pytest

import envs

N_AGENTS, N_ACTIONS, EPISODE_LEN = 6, 200, 288


def raw_env(config="env_1"):
    from sustaingym.envs.building import MultiAgentBuildingEnv

    return MultiAgentBuildingEnv(envs._building_parameters(config))


def raw_vector(obss):
    """The raw env hands every agent the same vector: check that, return it as float32."""
    agents = sorted(obss)
    assert agents == list(range(N_AGENTS))
    v = np.asarray(obss[0])
    for a in agents:
        np.testing.assert_array_equal(np.asarray(obss[a]), v)
    return v.astype(np.float32)


def eq31(v):
    """Paper Eq. (31) written out: agent i sees (T_i, T_out, T_ground, GHI, occupancy)."""
    return np.stack([np.array([v[i], v[6], v[7], v[8], v[9]], dtype=np.float32) for i in range(N_AGENTS)])


def rollout_both(day_ours, seed_raw, actions_seq, config="env_1"):
    """Step our adapter from reset(day_ours) and the raw env from reset(seed=seed_raw) with the
    same actions; return both trajectories as lists of (obs, state, reward)."""
    ours, raw = envs.make_env("building", config), raw_env(config)
    o, s, _av = ours.reset(day_ours)
    v = raw_vector(raw.reset(seed=seed_raw)[0])
    traj_ours, traj_raw = [(o, s, None)], [(eq31(v), v, None)]
    for a in actions_seq:
        o, s, _av, r, _term, _trunc, _ = ours.step(a)
        obss, rews, _, _, _ = raw.step([int(x) for x in a])
        v = raw_vector(obss)
        traj_ours.append((o, s, r))
        traj_raw.append((eq31(v), v, rews))
    return traj_ours, traj_raw


def same_trajectory(a, b):
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def actions_seq():
    rng = np.random.default_rng(123)
    return rng.integers(0, N_ACTIONS, size=(25, N_AGENTS))


def test_dimensions_and_avail():
    env = envs.make_env("building", "env_1")
    assert (env.n_agents, env.n_actions, env.obs_dim, env.state_dim, env.episode_limit) == (6, 200, 5, 10, 288)
    obs, state, avail = env.reset(0)
    assert obs.shape == (6, 5) and state.shape == (10,)
    assert avail.shape == (6, 200) and avail.dtype == np.bool_ and avail.all()
    obs, state, avail, *_ = env.step(np.full(6, 150))
    assert avail.shape == (6, 200) and avail.dtype == np.bool_ and avail.all()


@pytest.mark.parametrize("day", [0, 1, 100, 199, 364])
def test_obs_state_reward_match_raw_env(day, actions_seq):
    """reset(d) == raw reset(seed=d) for d < 365; obs = state[[i,6,7,8,9]]; state = full vector;
    team reward = sum of the six agents' rewards = 6 x the raw per-agent reward."""
    ours, raw = rollout_both(day, day, actions_seq)
    for k, ((o, s, r), (o_raw, s_raw, rews)) in enumerate(zip(ours, raw)):
        assert o.shape == (6, 5) and s.shape == (10,)
        np.testing.assert_array_equal(s, s_raw, err_msg=f"state, step {k}")
        np.testing.assert_array_equal(o, o_raw, err_msg=f"Eq. (31) obs, step {k}")
        if rews is not None:
            assert sorted(rews) == list(range(6))
            per_agent = [float(rews[i]) for i in range(6)]
            assert len(set(per_agent)) == 1  # every agent gets the same reward
            assert r == pytest.approx(sum(per_agent), rel=1e-12, abs=0)
            assert r == pytest.approx(6.0 * per_agent[0], rel=1e-12, abs=0)
            assert r < 0  # building rewards are negative


def test_obs_of_each_agent_is_its_own_zone(actions_seq):
    """A hand-made example of Eq. (31) on a real state: agent 3 sees T_zone3 and the shared four."""
    env = envs.make_env("building", "env_1")
    env.reset(10)
    for a in actions_seq[:5]:
        obs, state, *_ = env.step(a)
    for i in range(6):
        assert obs[i, 0] == state[i]
        assert list(obs[i, 1:]) == [state[6], state[7], state[8], state[9]]
    assert len(set(state[:6].tolist())) > 1  # zones differ after a few steps: the test has teeth


def test_day_wraps_modulo_365_not_clamped(actions_seq):
    """reset(400) == raw reset(seed=35), != raw reset(seed=400) (clamped by sustaingym to the last
    sample of the year), != reset(364); reset(365 + d) == reset(d)."""
    ours_400, raw_35 = rollout_both(400, 35, actions_seq)
    assert same_trajectory(ours_400, raw_35)
    _, raw_400 = rollout_both(400, 400, actions_seq)
    assert not same_trajectory(ours_400, raw_400)
    # sustaingym's clamp: raw seeds 400 and 600 are the same episode; ours are not.
    _, raw_600 = rollout_both(600, 600, actions_seq)
    assert same_trajectory(raw_400, raw_600)
    ours_600, _ = rollout_both(600, 600 % 365, actions_seq)
    assert not same_trajectory(ours_400, ours_600)
    ours_364, _ = rollout_both(364, 364, actions_seq)
    assert not same_trajectory(ours_400, ours_364)
    ours_735, raw_5 = rollout_both(735, 5, actions_seq)  # 735 = 2 * 365 + 5
    assert same_trajectory(ours_735, raw_5)


def test_episode_is_288_steps_truncated_not_terminated():
    env, raw = envs.make_env("building", "env_1"), raw_env("env_1")
    env.reset(42)
    raw.reset(seed=42)
    rng = np.random.default_rng(0)
    for step in range(1, EPISODE_LEN + 1):
        a = rng.integers(0, N_ACTIONS, N_AGENTS)
        _, _, _, _, terminated, truncated, _ = env.step(a)
        _, _, raw_term, raw_trunc, _ = raw.step([int(x) for x in a])
        assert terminated is False, step
        if step < EPISODE_LEN:
            assert truncated is False, step
            assert not raw_term[0] and not raw_trunc[0]
        else:
            assert truncated is True
            # the raw env says terminated=True here: the adapter must turn it into a time limit
            assert raw_term[0] and raw_trunc[0]


def test_reset_restarts_episode_counter():
    env = envs.make_env("building", "env_1")
    env.reset(3)
    for _ in range(100):
        env.step(np.zeros(6, dtype=int))
    env.reset(4)
    for step in range(1, EPISODE_LEN + 1):
        *_, terminated, truncated, _ = env.step(np.zeros(6, dtype=int))
        assert truncated == (step == EPISODE_LEN) and not terminated


PAPER_TABLE_3 = {  # paper Table 3, written out by hand
    "env_1": ("Hot_Dry", "Tucson"),
    "env_2": ("Hot_Humid", "Tampa"),
    "env_3": ("Very_Hot_Humid", "Honolulu"),
    "env_4": ("Warm_Dry", "ElPaso"),
    "env_5": ("Cool_Marine", "Seattle"),
    "env_6": ("Mixed_Humid", "NewYork"),
}


def test_configs_are_paper_table_3(monkeypatch):
    """Every config reaches ParameterGenerator with its Table 3 (weather, location), OfficeSmall,
    ac_map=1, discrete actions (the uncached function body, with a recording fake generator)."""
    import sustaingym.envs.building as sb

    calls = []

    def fake_generator(**kwargs):
        calls.append(kwargs)
        return {"fake": kwargs["location"]}

    assert envs.BUILDING_CONFIGS == PAPER_TABLE_3
    monkeypatch.setattr(sb, "ParameterGenerator", fake_generator)
    uncached = envs._building_parameters.__wrapped__  # leaves the real cache untouched
    for name, (weather, location) in PAPER_TABLE_3.items():
        assert uncached(name) == {"fake": location}
        assert calls[-1] == {
            "building": "OfficeSmall",
            "weather": weather,
            "location": location,
            "ac_map": 1,
            "is_continuous_action": False,
        }
    assert len(calls) == 6


def test_parameter_generator_built_once_and_build_log():
    """Real build: ParameterGenerator runs once per config per process (lru cache: two envs of
    one config add no miss); BUILD_LOG records every make_env; env_1 and env_6 weather differ."""
    envs._building_parameters("env_1")
    before = envs._building_parameters.cache_info()
    n_log = len(envs.BUILD_LOG)
    e1, e2 = envs.make_env("building", "env_1"), envs.make_env("building", "env_1")
    after = envs._building_parameters.cache_info()
    assert after.misses == before.misses  # no new ParameterGenerator call
    assert after.hits >= before.hits + 2
    assert envs.BUILD_LOG[n_log:] == [("building", "env_1"), ("building", "env_1")]
    assert envs._building_parameters("env_1") is envs._building_parameters("env_1")
    assert e1.config == e2.config == "env_1"
    e6 = envs.make_env("building", "env_6")
    assert envs.BUILD_LOG[-1] == ("building", "env_6")
    t_out_1, t_out_6 = e1.reset(100)[1][6], e6.reset(100)[1][6]
    assert t_out_1 != t_out_6  # Tucson vs New York outdoor temperature on the same day


@pytest.mark.parametrize(
    "env_id,config,flag",
    [
        ("building", "env_9", "--train-config"),
        ("building", "env_0", "--train-config"),
        ("building", "Hot_Dry", "--train-config"),
        ("foo", "env_1", "--env"),
    ],
)
def test_bad_names_raise_env_arg_error(env_id, config, flag):
    n_log = len(envs.BUILD_LOG)
    with pytest.raises(envs.EnvArgError) as info:
        envs.make_env(env_id, config)
    msg = str(info.value)
    assert msg.startswith(flag) and "\n" not in msg and repr(config if flag != "--env" else env_id) in msg
    assert len(envs.BUILD_LOG) == n_log  # nothing built


def test_normalised_return_eq33():
    assert envs.normalised_return(-9000.0) == 0.0
    assert envs.normalised_return(0.0) == 1.0
    assert envs.normalised_return(-900.0) == pytest.approx(0.9, abs=1e-15)
