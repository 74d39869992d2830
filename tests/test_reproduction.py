"""The released configuration behind the published tables (issue 9): the QMIX mixer's init, the QTRAN V net,
the released TV dual's fixed point, the result report and several authors' directories in eval.py.

Every expected value is computed here, independently of the code under test: xavier bounds from the
layer sizes, the V net by hand from its parameters, the dual's minimiser by brute force over a grid,
means and standard errors with numpy.
"""

import json
import math

import numpy as np
import pytest
import torch
from conftest import import_file

QMIX_SCRIPTS = ["robust_qmix_rho", "robust_qmix_tv", "groupdr_qmix"]
QTRAN_SCRIPTS = ["robust_qtran_rho", "robust_qtran_tv", "groupdr_qtran"]
TV_SCRIPTS = ["robust_vdn_tv", "robust_qmix_tv", "robust_qtran_tv"]
ALL_SCRIPTS = [
    "robust_vdn_rho",
    "robust_vdn_tv",
    "robust_qmix_rho",
    "robust_qmix_tv",
    "robust_qtran_rho",
    "robust_qtran_tv",
    "groupdr_vdn",
    "groupdr_qmix",
    "groupdr_qtran",
]


def algo(name):
    return import_file(f"{name}_repro_under_test", f"algos/{name}.py")


@pytest.fixture(scope="module")
def env1_states():
    """Global states of real env_1 days (random actions): what the mixer sees at the start of training."""
    import envs

    rng, states = np.random.default_rng(0), []
    for day in (3, 60, 150):
        task = envs.make_env("building", "env_1")
        _, s, _ = task.reset(day)
        for _ in range(96):
            states.append(s)
            _, s, _, _, _, _, _ = task.step(rng.integers(0, task.n_actions, task.n_agents))
    return torch.tensor(np.array(states), dtype=torch.float32)


# ----------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("name", QMIX_SCRIPTS)
def test_mixer_init_is_xavier_gain_01_with_zero_bias(name):
    torch.manual_seed(0)
    mixer = algo(name).QMixer(6, 10, 32)
    linears = [m for m in mixer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5  # hyper_w1, hyper_b1, hyper_w2 and the two layers of V(s)
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        bound = 0.1 * math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform_(gain=0.1)
        w = layer.weight.detach()
        assert w.abs().max() <= bound + 1e-7
        assert w.abs().max() >= 0.8 * bound  # a uniform draw fills its range (torch's default bound is far wider)
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3)
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("name", QMIX_SCRIPTS)
def test_mixer_output_scale_at_init_on_env1_states(name, env1_states):
    """With Q_i in the range of early training (-100..0), the released init gives Q_tot of tens; torch's
    default init on the same unscaled states gives hundreds (the first target period then chases it)."""
    torch.manual_seed(1)
    mixer = algo(name).QMixer(6, 10, 32)
    q = torch.empty(len(env1_states), 6).uniform_(-100.0, 0.0)
    released = mixer(q, env1_states).abs().median().item()
    for layer in mixer.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()  # torch's default init
    default = mixer(q, env1_states).abs().median().item()
    assert released < 100.0
    assert default > 4 * released


# ----------------------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("name", QTRAN_SCRIPTS)
def test_qtran_v_net_is_the_released_shape(name):
    torch.manual_seed(0)
    net = algo(name).QTranNetworks(6, 200, 10, 64)
    assert tuple(net.v_state.weight.shape) == (64, 10) and tuple(net.v_feat.weight.shape) == (64, 64)
    assert tuple(net.v_fc.weight.shape) == (64, 128) and tuple(net.v_out.weight.shape) == (1, 64)
    s, f = torch.randn(5, 10), torch.randn(5, 64)
    relu = torch.relu
    hidden = torch.cat(
        [relu(s @ net.v_state.weight.T + net.v_state.bias), relu(f @ net.v_feat.weight.T + net.v_feat.bias)], -1
    )
    expected = relu(hidden @ net.v_fc.weight.T + net.v_fc.bias) @ net.v_out.weight.T + net.v_out.bias
    torch.testing.assert_close(net.v_tot(s, f), expected.squeeze(-1))


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_paper_silent_defaults_are_the_released_ones(name):
    """RMSprop eps 1e-5 everywhere; clip none for VDN, 1.0 for QTRAN-TV (Q and dual), 10 otherwise."""
    args = algo(name).Args() if not name.startswith("groupdr") else algo(name).Args(estimator_checkpoint="x")
    assert args.rmsprop_eps == 1e-5
    expected_clip = 0.0 if "vdn" in name else 1.0 if name == "robust_qtran_tv" else 10.0
    assert args.max_grad_norm == expected_clip
    if name in TV_SCRIPTS:
        assert args.dual_max_grad_norm == (1.0 if name == "robust_qtran_tv" else 0.0)


@pytest.mark.parametrize("name", TV_SCRIPTS)
def test_tv_scripts_accept_rho_zero(name):
    """The released TV grid starts at 0: accepted, and Eq. (10)'s upper bound is then infinite."""
    module = algo(name)
    args = module.Args(rho=0.0)
    module.check_args(args)  # no SystemExit
    lo, hi = module.eta_bounds(torch.tensor([-3.0, -1.0]), 0.997, 0.0)
    assert lo.item() == 0.0 and math.isinf(hi)
    with pytest.raises(SystemExit):
        module.check_args(module.Args(rho=-0.1))


# ----------------------------------------------------------------------------------------- item 4
@pytest.mark.parametrize("name", TV_SCRIPTS)
@pytest.mark.parametrize("rho", [0.1, 0.2, 0.5])
def test_released_squared_dual_is_minimised_at_eta_equal_next_value(name, rho):
    """Released dual: per sample (relu(eta - Q') - (1 - rho) eta)^2. For Q' < 0 its minimiser is eta = Q'
    (brute force over a fine grid), so the TV target becomes r + gamma (1 - rho) Q': rho-contamination's
    target, a discount of gamma (1 - rho). The paper's linear Eq. (17) with the Eq. (10) clamp is minimised
    at the floor eta = 0, which gives the nominal target r + gamma Q'."""
    module, gamma = algo(name), 0.997
    next_values = [-250.0, -40.0, -3.5, -0.2]
    grid = torch.linspace(-400.0, 50.0, 450_001, dtype=torch.float64)  # step 0.001
    for q in next_values:
        v = torch.full_like(grid, q)
        per_sample = torch.stack(
            [module.dual_loss(grid[i : i + 1], v[i : i + 1], rho, kind="squared") for i in range(0, len(grid), 5_000)]
        )  # the script's own loss, coarse
        assert per_sample.argmin().item() == int(
            np.argmin([((max(e - q, 0.0)) - (1 - rho) * e) ** 2 for e in grid[::5_000].tolist()])
        )
        exact = (torch.relu(grid - q) - (1 - rho) * grid) ** 2  # the released term, written out here
        eta_star = grid[exact.argmin()].item()
        assert abs(eta_star - q) <= 1e-3
        y = module.robust_target(
            torch.tensor([-7.0]), torch.tensor([q]), torch.tensor([eta_star]), torch.tensor([0.0]), gamma, rho
        )
        assert abs(y.item() - (-7.0 + gamma * (1 - rho) * q)) < 1e-3
        # the paper's linear loss on Eq. (10)'s range: minimised at the floor, nominal target
        lo, hi = 0.0, 2.0 / (rho * (1 - gamma))
        feasible = grid[(grid >= lo) & (grid <= hi)]
        linear = torch.relu(feasible - q) - (1 - rho) * feasible
        assert feasible[linear.argmin()].item() == pytest.approx(0.0, abs=1.5e-3)  # the first grid point >= 0
        y0 = module.robust_target(
            torch.tensor([-7.0]), torch.tensor([q]), torch.tensor([0.0]), torch.tensor([0.0]), gamma, rho
        )
        assert abs(y0.item() - (-7.0 + gamma * q)) < 1e-4


# ----------------------------------------------------------------------------------------- item 6
def _fake_result(method, rho, seed, env1, env6, season, paper="QMIX TV"):
    climate = {f"env_{i}": env1 - 0.01 * i for i in range(1, 7)}
    climate["env_1"], climate["env_6"] = env1, env6
    return {
        "grid": "g",
        "method": method,
        "paper": paper,
        "script": "algos/robust_qmix_tv.py",
        "flags": [],
        "rho": rho,
        "seed": seed,
        "run_name": f"g/{method}__rho{rho!r}__seed{seed}",
        "command": f"python x --seed {seed}",
        "args": {},
        "commit": "abc",
        "train_seconds": 60.0,
        "eval_days": [1, 2],
        "normalised_return": {"paper-tables": {"env_1": env1, "env_6": env6}, "climate": climate, "season": {"env_1": season}},
        "curve": {
            "tag": "charts/normalised_return",
            "episodes": [10, 20],
            "env_steps": [2870, 5740],
            "mean": [env1 - 0.5, env1],
        },
    }


def test_report_tables_from_fixed_json(tmp_path):
    report = import_file("report_under_test", "experiments/report.py")
    res = tmp_path / "results" / "g"
    res.mkdir(parents=True)
    runs = [
        _fake_result("qmix_tv_released", 0.2, s, e1, e6, se)
        for s, e1, e6, se in [(1, 0.90, 0.60, 0.50), (2, 0.92, 0.50, 0.55), (3, 0.88, 0.70, 0.45)]
    ]
    runs.append(_fake_result("qmix_released", 0.0, 1, 0.85, 0.33, 0.4, paper="QMIX non-robust"))
    for r in runs:
        (res / f"{r['method']}__seed{r['seed']}.json").write_text(json.dumps(r))
    out = tmp_path / "results.md"
    text = report.main(report.Args(results=[str(res)], out=str(out)))
    assert out.read_text() == text

    def row(method):  # the Tables 1-2 row: 10 cells (Figure 2's rows have 8)
        return next(line for line in text.splitlines() if line.startswith(f"| {method} | ") and line.count("|") == 11)

    e1 = np.array([0.90, 0.92, 0.88])
    m, se = e1.mean(), e1.std() / np.sqrt(3)  # population std / sqrt(n), as the paper
    z = (m - 0.916) / np.hypot(se, 0.006)
    cells = [c.strip() for c in row("qmix_tv_released").split("|")[1:-1]]
    assert cells[:3] == ["qmix_tv_released", "0.2", "3"]
    assert cells[3] == f"{m:.3f} +- {se:.3f}" and cells[4] == "0.916 +- 0.006" and cells[5] == f"{z:+.1f}"
    e6 = np.array([0.60, 0.50, 0.70])
    assert cells[6] == f"{e6.mean():.3f} +- {e6.std() / np.sqrt(3):.3f}" and cells[7] == "0.520 +- 0.048"
    single = [c.strip() for c in row("qmix_released").split("|")[1:-1]]
    assert single[2] == "1" and single[3] == "0.850" and single[4] == "0.895 +- 0.008"
    assert single[5] == "-" and single[6] == "0.330"  # one seed: no SE of ours, so no z
    import matplotlib.image

    for png in ("climate.png", "curves.png"):
        image = matplotlib.image.imread(tmp_path / "results" / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a real, non-blank picture


def test_eval_aggregates_several_authors_dirs(tmp_path, eval_mod):
    """--authors-dir DIR DIR: one directory per seed of a released run, grouped as one method by run name
    (the date and time stripped), mean +- SE over the directories as for checkpoints."""
    vdn = import_file("robust_vdn_rho_authors_ut", "algos/robust_vdn_rho.py")
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = vdn.QNetworks(6, 5, 200, 64)
        d = tmp_path / f"results_seeds_{seed}" / f"robust_qmix_rho_0.012_2025091{seed}_20363{seed}" / "network_parameter"
        d.mkdir(parents=True)
        for k in range(6):
            torch.save(eval_mod.agent_state_dict(net.drqn, k), d / f"agent_{k}_q_network.pt")
        dirs.append(str(d))
    base = {"protocol": "custom", "configs": "env_1", "days": "5:7", "episode_steps": 6}
    together = eval_mod.main(eval_mod.Args(authors_dir=dirs, out=str(tmp_path / "both.json"), **base))
    alone = [
        eval_mod.main(eval_mod.Args(authors_dir=[d], out=str(tmp_path / f"{i}.json"), **base)) for i, d in enumerate(dirs)
    ]
    assert list(together["table"]) == ["authors: robust_qmix_rho_0.012"]
    cell = together["table"]["authors: robust_qmix_rho_0.012"]["env_1"]
    per_dir = [np.mean(a["episodes"][0]["normalised"]) for a in alone]
    assert per_dir[0] != per_dir[1]  # two different networks
    assert cell["n_seeds"] == 2
    assert cell["mean"] == pytest.approx(np.mean(per_dir)) and cell["se"] == pytest.approx(np.std(per_dir) / np.sqrt(2))
