"""experiments/groupdr_heads.py: one head's effect on r_tilde = min_k r_hat_k, against values computed by hand."""

import pytest
import torch
from conftest import import_file


@pytest.fixture(scope="module")
def heads():
    return import_file("groupdr_heads_under_test", "experiments/groupdr_heads.py")


def test_head_effect_by_hand(heads):
    """Head 2 is the minimum of rows 0 and 2 (by 1.0 and 0.5 below the next head), not of rows 1 and 3."""
    pred = torch.tensor([[-5.0, -4.0, -6.0], [-9.0, -3.0, -2.0], [-1.0, -1.5, -2.0], [-7.0, -7.0, -7.0]])
    e = heads.head_effect(pred, 2)
    assert e["share_min"] == 0.5  # rows 0, 2 (row 3's tie goes to head 0, argmin's first)
    assert e["mean_gap"] == pytest.approx((1.0 + 0.0 + 0.5 + 0.0) / 4) and e["max_gap"] == 1.0
    # head 0: the minimum of row 1 (6.0 below head 1) and of row 3 (a tie: no gap)
    assert heads.head_effect(pred, 0) == {"share_min": 0.5, "mean_gap": 1.5, "max_gap": 6.0}


def test_head_effect_of_the_only_minimum_head(heads):
    pred = torch.tensor([[-5.0, -4.0], [-9.0, -3.0]])
    assert heads.head_effect(pred, 0) == {"share_min": 1.0, "mean_gap": 3.5, "max_gap": 6.0}


def test_bad_input_is_one_error_line(heads, tmp_path, capsys):
    assert heads.main(heads.Args(estimator=str(tmp_path / "none.pt"))) == 2
    assert capsys.readouterr().err.strip() == f"error: no such file '{tmp_path / 'none.pt'}'"
    assert heads.main(heads.Args(estimator="x.pt", configs="env_1,env_9")) == 2
    assert "--configs 'env_9' is unknown" in capsys.readouterr().err


def test_missing_behaviour_names_its_flag(heads, tmp_path, capsys):
    gdr = import_file("groupdr_reward", "algos/groupdr_reward.py")
    path = str(tmp_path / "estimator.pt")
    net = gdr.ReleasedEstimator(10, 6, 200, 2, hidden_dim=4)
    torch.save(
        {
            "format": gdr.ESTIMATOR_FORMAT,
            "configs": ["env_1", "env_6"],
            "n_agents": 6,
            "n_actions": 200,
            "state_dim": 10,
            "architecture": "released",
            "hidden_dim": 4,
            "time_norm": 288.0,
            "estimator": net.state_dict(),
        },
        path,
    )
    assert heads.main(heads.Args(estimator=path, behaviour=str(tmp_path / "nope.pt"))) == 2
    assert capsys.readouterr().err.strip() == f"error: --behaviour: no such file '{tmp_path / 'nope.pt'}'"
