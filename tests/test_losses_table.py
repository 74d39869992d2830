"""experiments/losses.py: the per-bin means of a run's logged scalars, against values written here."""

import pytest
from conftest import import_file
from torch.utils.tensorboard import SummaryWriter


@pytest.fixture(scope="module")
def losses():
    return import_file("losses_under_test", "experiments/losses.py")


def test_bins_hold_the_mean_of_the_values_logged_inside_them(losses, tmp_path):
    """Steps 1..8 with value = step for the return, td loss only at steps 2 and 8: two bins (0-4, 4-8) must
    read (1+2+3+4)/4 = 2.5 and (5+6+7+8)/4 = 6.5 for the return, 2 and 8 for the td loss; an absent tag is
    left out, a tag with no point in a bin shows '-'."""
    writer = SummaryWriter(str(tmp_path))
    for step in range(1, 9):
        writer.add_scalar("charts/normalised_return", float(step), step)
    writer.add_scalar("losses/td_loss", 2.0, 2)
    writer.add_scalar("losses/td_loss", 8.0, 8)
    writer.add_scalar("losses/opt_loss", 1.0, 1)
    writer.close()
    text = losses.table(str(tmp_path), ["charts/normalised_return", "losses/td_loss", "losses/opt_loss", "robust/eta_mean"], 2)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| env")]
    assert "robust/eta_mean" not in text and "8 env steps" in text
    assert rows == ["| 0-4 | 2.5 | 2 | 1 |", "| 4-8 | 6.5 | 8 | - |"]


def test_training_minutes_leave_out_a_resumed_runs_pause(losses, tmp_path):
    """Points at 0, 60 and 120 s, then (resumed after a two-hour pause) at 7320 and 7380 s: 3 min of training,
    not the 123 min from the first to the last point."""
    writer = SummaryWriter(str(tmp_path))
    for step, wall in enumerate([1000.0, 1060.0, 1120.0, 8320.0, 8380.0], start=1):
        writer.add_scalar("charts/normalised_return", float(step), step, walltime=wall)
    writer.close()
    text = losses.table(str(tmp_path), ["charts/normalised_return"], 1)
    assert "5 env steps, 3.0 min of training" in text.splitlines()[0]


def test_bad_input_is_one_error_line(losses, tmp_path, capsys):
    assert losses.main(losses.Args(runs=[str(tmp_path / "nope")])) == 2
    assert capsys.readouterr().err.strip() == f"error: no run folder '{tmp_path / 'nope'}'"
    assert losses.main(losses.Args(runs=[str(tmp_path)], bins=0)) == 2
