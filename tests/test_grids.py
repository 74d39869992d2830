"""The grid files shipped in experiments/ (the commands the docs tell users to run) are valid: each loads with
sweep.load_grid, names scripts that exist, and every job's command line (the grid's flags, --rho where the script
has it, --seed, --run-name, the stage outputs it reads) parses with its script's own Args, so a misspelt flag or
an unknown choice in a grid fails here, not hours into a sweep."""

import glob
import os

import pytest
from conftest import ROOT, import_file

GRIDS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.toml")))


def test_the_shipped_grids_are_found():
    names = {os.path.basename(g) for g in GRIDS}
    assert {"paper_tables.toml", "starcraft_learning.toml", "starcraft_figures.toml"} <= names


@pytest.mark.parametrize("grid", GRIDS, ids=os.path.basename)
def test_every_job_of_a_shipped_grid_parses_with_its_script(grid):
    sweep = import_file("sweep_under_test", "experiments/sweep.py")
    runs = import_file("runs", "runs.py")
    name, jobs = sweep.load_grid(grid)
    assert name == os.path.basename(grid)[: -len(".toml")] and jobs
    for job in jobs:
        assert os.path.isfile(os.path.join(ROOT, job.script)), job.script
        module = import_file("grid_" + os.path.basename(job.script)[: -len(".py")], job.script)
        argv = job.train_command(resume=False)[2:]  # after python and the script's path
        args = runs.parse_args(module.Args, job.script, check=None, argv=argv)  # tyro: unknown flags / choices exit
        assert args.seed == job.seed and args.run_name == job.run_name
        if job.rho_flag and not job.stage:
            assert args.rho == pytest.approx(job.rho)
