"""How much one estimator head changes GroupDR's worst-case reward r_tilde = min_k r_hat_k (docs/groupdr.md).

    python experiments/groupdr_heads.py runs/groupdr_env6/groupdr_estimator_env6/estimator.pt \
        --behaviour runs/paper_tables/groupdr_behaviour/model.pt --compare runs/paper_tables/groupdr_estimator/estimator.pt

The released estimator had a head for env_6 too; ours (paper F.2) has five. This plays --episodes behaviour
episodes (epsilon-greedy, one joint coin at --epsilon, as stage 1 does) in each of --configs and reports, per
config, over every transition (s, a, t): how often the --head is the minimum of the estimator's heads, and
r_tilde with it minus r_tilde without it (min over the other heads; >= 0, since a minimum over more heads is
never larger). With --compare, another estimator's r_tilde on the same transitions too (e.g. the five-head
estimator the paper_tables runs read): the size of a refit's change, next to the head's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "algos")]
import groupdr_estimator  # load_behaviour
import groupdr_offline  # collect: behaviour episodes, batched
import groupdr_reward as gdr  # load_estimator

import envs


@dataclass
class Args:
    estimator: tyro.conf.Positional[str]
    """estimator.pt whose --head is measured"""
    behaviour: str = "runs/paper_tables/groupdr_behaviour/model.pt"
    """model.pt of the behaviour policy that plays the episodes"""
    compare: str = ""
    """another estimator.pt (same groups but the head) whose r_tilde is compared on the same transitions; '' = none"""
    head: str = "env_6"
    """the head (config) whose effect on the minimum is measured"""
    configs: str = gdr.TRAIN_CONFIGS
    """comma-separated configs the episodes are played in (GroupDR's training configs)"""
    episodes: int = 4
    """episodes per config, each on a day drawn uniformly from days 0-199"""
    epsilon: float = 0.5
    """epsilon of the behaviour policy (one joint coin, as stage 1 plays)"""
    seed: int = 0
    """seed of the days, exploration and random actions"""


def head_effect(pred: torch.Tensor, k: int) -> dict:
    """pred (B, K): every head's r_hat on B transitions; k: the measured head -> how often it is the minimum,
    and r_tilde without it minus r_tilde with it (mean, max)."""
    with_k = pred.min(-1).values
    without_k = torch.cat([pred[:, :k], pred[:, k + 1 :]], -1).min(-1).values
    gap = without_k - with_k
    return {
        "share_min": float((pred.argmin(-1) == k).float().mean()),
        "mean_gap": float(gap.mean()),
        "max_gap": float(gap.max()),
    }


def main(args: Args) -> int:
    torch.set_num_threads(1)
    try:
        configs = gdr.parse_configs(args.configs, allow_env6=True)
        if args.episodes < 1 or not 0.0 <= args.epsilon <= 1.0:
            raise envs.EnvArgError(f"--episodes must be >= 1 (got {args.episodes}), --epsilon in [0, 1] (got {args.epsilon})")
        task = envs.make_env("building", configs[0])
        dims = (task.n_agents, task.n_actions, task.state_dim)
        estimator, ckpt = gdr.load_estimator(args.estimator, *dims)
        if args.head not in ckpt["configs"]:
            raise envs.EnvArgError(f"--head {args.head} is not a head of '{args.estimator}' ({','.join(ckpt['configs'])})")
        other = gdr.load_estimator(args.compare, *dims)[0] if args.compare else None
        if not os.path.isfile(args.behaviour):
            raise envs.EnvArgError(f"--behaviour: no such file '{args.behaviour}'")
    except (envs.EnvArgError, gdr.EstimatorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    module, q_network, b_ckpt = groupdr_estimator.load_behaviour(args.behaviour, "cpu")
    k, rng = ckpt["configs"].index(args.head), np.random.default_rng(args.seed)
    print(
        f"| config | transitions | {args.head} is the min | r_tilde without - with it: mean | max |"
        + (" mean abs r_tilde, --compare - this |" if other else "")
    )
    print("|---" * (6 if other else 5) + "|")
    for config in configs:
        tasks = [envs.make_env("building", config) for _ in range(args.episodes)]
        days = rng.integers(0, 200, args.episodes).tolist()
        d = groupdr_offline.collect(
            module, q_network, tasks, days, b_ckpt["args"]["window"], args.epsilon, 0, rng, joint_coin=True
        )
        s, a, t = (torch.from_numpy(d[key]) for key in ("state", "actions", "t"))
        with torch.no_grad():
            pred = estimator(s, a, t)
            e = head_effect(pred, k)
            cmp = f" {(other(s, a, t).min(-1).values - pred.min(-1).values).abs().mean():.3f} |" if other else ""
        print(f"| {config} | {len(t)} | {100 * e['share_min']:.2f}% | {e['mean_gap']:.4f} | {e['max_gap']:.3f} |{cmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
