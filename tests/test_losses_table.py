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


def test_bad_input_is_one_error_line(losses, tmp_path, capsys):
    assert losses.main(losses.Args(runs=[str(tmp_path / "nope")])) == 2
    assert capsys.readouterr().err.strip() == f"error: no run folder '{tmp_path / 'nope'}'"
    assert losses.main(losses.Args(runs=[str(tmp_path)], bins=0)) == 2
