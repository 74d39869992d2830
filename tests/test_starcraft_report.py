"""experiments/starcraft_report.py on hand-made result JSONs: the table's means and SEs, the Figure 4
differences and their bootstrap intervals, computed here from the same numbers."""

import json

import numpy as np
import pytest
from conftest import import_file


@pytest.fixture(scope="module")
def report():
    return import_file("starcraft_report_under_test", "experiments/starcraft_report.py")


def write_run(folder, method, rho, seed, clean, noisy):
    steps = [10_000 * (i + 1) for i in range(len(clean))]
    sc = {"env_steps": steps, "win_rate_clean": clean, "win_rate_noisy": noisy, "return_clean": clean, "return_noisy": noisy}
    sc["final"] = {"step": steps[-1], "win_rate_clean": clean[-1], "win_rate_noisy": noisy[-1]}
    run = {
        "method": method,
        "rho": rho,
        "seed": seed,
        "run_name": f"g/{method}__rho{rho}__seed{seed}",
        "commit": "abc",
        "machine": [{"cpu": "AMD EPYC", "torch": "2.13.0+cpu"}],
        "train_seconds": 600.0,
        "command": "python algos/x.py",
        "starcraft": sc,
    }
    (folder / f"{method}__rho{rho}__seed{seed}.json").write_text(json.dumps(run))


def test_table_and_figure4(report, tmp_path):
    folder = tmp_path / "docs" / "results" / "g"
    folder.mkdir(parents=True)
    write_run(folder, "qmix", 0.0, 1, [0.0, 0.25, 0.5], [0.0, 0.125, 0.25])
    write_run(folder, "qmix", 0.0, 2, [0.0, 0.5, 0.75], [0.0, 0.25, 0.5])
    write_run(folder, "qmix", 0.01, 1, [0.0, 0.5], [0.0, 0.5])  # a shorter run: the table takes its last round
    write_run(folder, "qmix", 0.01, 2, [0.25, 0.5, 1.0], [0.125, 0.5, 0.625])
    (folder / "failed").mkdir()  # not a result
    text = report.main(report.Args(results=str(folder), last_rounds=2))
    # rho 0: last clean 0.5, 0.75 -> 0.625 +- 0.125 / sqrt 2 = 0.088 (population std / sqrt n); noisy 0.25, 0.5;
    # last 2 rounds: clean (0.25 + 0.5) / 2, (0.5 + 0.75) / 2 = 0.375, 0.625 -> 0.5 +- 0.088; noisy 0.1875, 0.375 ->
    # 0.28125 +- 0.09375 / sqrt 2 = 0.066
    assert (
        "| qmix | 0 | 2 | 30,000 | 0.625 +- 0.088 | 0.375 +- 0.088 | 0.500 +- 0.088 | 0.281 +- 0.066 | 0.625 +- 0.088 |"
        in text
    )
    # rho 0.01: last rounds 0.5 (at 20k) and 1.0 -> 0.750 +- 0.25 / sqrt 2; noisy 0.5, 0.625 -> 0.5625 +- 0.0625 / sqrt 2;
    # last 2: clean 0.25, 0.75 -> 0.5 +- 0.177; noisy 0.25, 0.5625 -> 0.40625 +- 0.15625 / sqrt 2 = 0.110;
    # env steps: the shorter run's
    assert (
        "| qmix | 0.01 | 2 | 20,000 | 0.750 +- 0.177 | 0.562 +- 0.044 | 0.500 +- 0.177 | 0.406 +- 0.110 | 0.750 +- 0.177 |"
        in text
    )
    assert "clean, last 2 | noisy, last 2 |" in text
    # Figure 4: 0.5625 - 0.375 = +0.1875; interval: the stratified bootstrap of stats.py on the same numbers
    diff, low, high = import_file("stats_under_test", "experiments/stats.py").bootstrap_diff_ci([0.5, 0.625], [0.25, 0.5])
    assert diff == pytest.approx(0.1875)
    assert f"| qmix | 0.01 | 2, 2 | +0.188 | [{low:+.3f}, {high:+.3f}] |" in text
    # by hand: each resampled mean of 2 values takes 3 values; the extremes are 0.5 - 0.5 = 0 and 0.625 - 0.25
    assert low == pytest.approx(0.0) and high == pytest.approx(0.375)
    assert (tmp_path / "docs" / "results_g.md").read_text() == text
    assert (tmp_path / "docs" / "results" / "g_curves.png").stat().st_size > 0
    steps, mean, se = report.curve(report.load(str(folder))[("qmix", 0.01)], "win_rate_clean")
    assert steps.tolist() == [10_000, 20_000]  # the rounds both seeds reached
    assert np.allclose(mean, [0.125, 0.5]) and np.allclose(se, [0.125 / 2**0.5, 0.0])


def test_one_seed_has_no_interval_and_empty_folder_fails(report, tmp_path):
    folder = tmp_path / "docs" / "results" / "h"
    folder.mkdir(parents=True)
    write_run(folder, "vdn", 0.0, 1, [0.5], [0.25])
    write_run(folder, "vdn", 0.05, 1, [0.5], [0.5])
    assert "| vdn | 0.05 | 1, 1 | +0.250 | needs 2+ seeds each |" in report.main(report.Args(results=str(folder)))
    empty = tmp_path / "docs" / "results" / "e"
    empty.mkdir()
    with pytest.raises(SystemExit):
        report.main(report.Args(results=str(empty)))
    with pytest.raises(SystemExit):
        report.main(report.Args(results=str(folder), last_rounds=0))
