"""The statistics of the claims table (experiments/report.py): robust - non-robust over independent seeds.

Both follow rliable (Agarwal et al., 2021) and marl-eval (Gorsane et al., 2022):

- `bootstrap_diff_ci`: the difference of the two methods' means over seeds with a stratified bootstrap
  percentile interval: each bootstrap replicate resamples the robust method's seeds with replacement and,
  independently, the non-robust method's seeds (rliable's `StratifiedIndependentBootstrap` on one task),
  and takes the difference of the two resampled means. A fixed RNG seed makes the interval a pure function
  of the inputs (the report is regenerated often; it must not change when nothing changed).
- `probability_of_improvement`: P(X > Y) over all (robust run, non-robust run) pairs, ties counting 1/2
  (the Mann-Whitney U statistic divided by n_x n_y), rliable's probability of improvement on one task.

Plain numpy, no new dependency: `pip install rliable` (1.2.0) changes none of our pins but adds arch and
statsmodels, and arch 7.2 fails at import with the pandas 3.1 that pvlib (a sustaingym dependency) brings. Checked once in
a separate venv with pandas 2.3: rliable's `get_interval_estimates` on released QMIX-TV - QMIX, env_6, 5 + 5 seeds,
gives [-0.2179, +0.0327], this module [-0.2179, +0.0338] (the same estimator; Monte Carlo noise at the 97.5% end),
and the same probability of improvement, 0.32.
"""

from __future__ import annotations

import numpy as np

REPS = 50_000  # rliable's default number of bootstrap replicates
SEED = 0


def bootstrap_diff_ci(x, y, reps: int = REPS, size: float = 0.95, seed: int = SEED) -> tuple[float, float, float]:
    """mean(x) - mean(y) and its `size` percentile interval from `reps` stratified bootstrap replicates.

    x, y: one number per seed (independent runs, not paired). Returns (difference, low, high).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or y.ndim != 1 or len(x) < 1 or len(y) < 1:
        raise ValueError("bootstrap_diff_ci needs two non-empty 1-d samples")
    rng = np.random.default_rng(seed)
    bx = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(axis=1)  # resample x's seeds ...
    by = y[rng.integers(0, len(y), size=(reps, len(y)))].mean(axis=1)  # ... and, independently, y's
    low, high = np.quantile(bx - by, [(1 - size) / 2, (1 + size) / 2])
    return float(x.mean() - y.mean()), float(low), float(high)


def probability_of_improvement(x, y) -> float:
    """P(X > Y) + P(X = Y) / 2 over all n_x * n_y pairs of a run of x and a run of y."""
    x, y = np.asarray(x, dtype=float)[:, None], np.asarray(y, dtype=float)[None, :]
    return float(((x > y) + 0.5 * (x == y)).mean())


def verdict(paper_diff: float, low: float, high: float) -> str:
    """reproduced: our interval excludes 0 on the side of the paper's difference; not reproduced: it excludes 0
    on the other side; otherwise (0 inside the interval, or a paper difference of exactly 0) not significant."""
    if paper_diff != 0 and (low > 0 or high < 0):
        return "reproduced" if (low > 0) == (paper_diff > 0) else "not reproduced"
    return "not significant either way"
