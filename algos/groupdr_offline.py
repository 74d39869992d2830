"""GroupDR stage 1, --fit offline (the first version of algos/groupdr_estimator.py; paper silent): collect every group's
episodes with the behaviour policy first, then fit the estimator (--architecture trunk: a 128-wide shared trunk on
standardised inputs and rewards, 5000 Adam steps). The default is the released online fit, in the script itself.
The behaviour acts epsilon-greedily (Alg. 2 l.8); the fitted r_hat_k give stage 2's r_tilde (groupdr_reward.py).
Docs: docs/groupdr.md.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

import envs  # the agents' acting window (History), normalised returns


@torch.no_grad()
def collect(module, q_network, tasks, days, window, epsilon, episode_steps, rng, device="cpu", joint_coin=False):
    """Run len(days) episodes of one config with the epsilon-greedy behaviour policy, len(tasks) at a
    time in lockstep (one batched greedy pass per step). Each agent flips its own epsilon coin, or all
    agents one (joint_coin). Every transition is kept, the last one of the day included (the released
    code drops it). -> dict of arrays state, actions, t, reward, returns."""
    N, A, obs_dim = tasks[0].n_agents, tasks[0].n_actions, tasks[0].obs_dim
    limit = min(episode_steps or tasks[0].episode_limit, tasks[0].episode_limit)
    out = {"state": [], "actions": [], "t": [], "reward": [], "returns": []}
    for start in range(0, len(days), len(tasks)):
        chunk = days[start : start + len(tasks)]
        lanes = tasks[: len(chunk)]
        first = [task.reset(day) for task, day in zip(lanes, chunk)]
        obs = np.stack([f[0] for f in first])
        state = np.stack([f[1] for f in first])
        avail = np.stack([f[2] for f in first])
        history = envs.History(len(lanes), window, N, obs_dim)
        history.reset(obs)
        returns, done = np.zeros(len(lanes)), np.zeros(len(lanes), dtype=bool)
        for t in range(limit):
            q = q_network.greedy_q(*history.tensors(device))
            greedy = module.masked_argmax(q, torch.from_numpy(avail).to(device)).cpu().numpy()
            random_actions = np.argmax(rng.random((len(lanes), N, A)) * avail, axis=-1)  # uniform over available
            coins = rng.random((len(lanes), 1)).repeat(N, 1) if joint_coin else rng.random((len(lanes), N))
            actions = np.where(coins < epsilon, random_actions, greedy)
            for e in np.flatnonzero(~done):
                o, s, av, r, term, trunc, _ = lanes[e].step(actions[e])
                out["state"].append(state[e].copy())
                out["actions"].append(actions[e].copy())
                out["t"].append(t)
                out["reward"].append(r)
                obs[e], state[e], avail[e] = o, s, av
                returns[e] += r
                done[e] = term or trunc
            history.push(obs, actions)
            if done.all():
                break
        out["returns"].extend(returns.tolist())
    return {
        "state": np.asarray(out["state"], dtype=np.float32).reshape(-1, tasks[0].state_dim),
        "actions": np.asarray(out["actions"], dtype=np.int64).reshape(-1, N),
        "t": np.asarray(out["t"], dtype=np.int64),
        "reward": np.asarray(out["reward"], dtype=np.float32),
        "returns": np.asarray(out["returns"]),
    }


def fit_estimator(
    estimator, data, steps, batch_size, learning_rate, val_fraction, rng, device="cpu", writer=None, log_every=0
):
    """--fit offline. data: one dict per head k (keys state, actions, t, reward). Every step draws batch_size
    transitions from each environment and minimises the mean over k of head k's MSE on its own
    environment's batch. -> per-head train/val MSE in env reward units, and min-head shares."""
    tensors, splits = [], []
    for d in data:
        n = len(d["reward"])
        perm = rng.permutation(n)
        n_val = round(val_fraction * n) if n > 1 else 0
        splits.append((perm[n_val:], perm[:n_val]))
        tensors.append({k: torch.from_numpy(np.asarray(d[k])).to(device) for k in ("state", "actions", "t", "reward")})
    if hasattr(estimator, "set_normalisation"):  # the trunk standardises with the pooled training split
        train_states = torch.cat([tb["state"][torch.from_numpy(tr).to(device)] for tb, (tr, _) in zip(tensors, splits)])
        train_rewards = torch.cat([tb["reward"][torch.from_numpy(tr).to(device)] for tb, (tr, _) in zip(tensors, splits)])
        estimator.set_normalisation(train_states, train_rewards)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=learning_rate)
    estimator.train()
    start = time.time()
    for step in range(steps):
        loss = 0.0
        for k, (tb, (tr, _)) in enumerate(zip(tensors, splits)):
            idx = torch.from_numpy(tr[rng.integers(0, len(tr), batch_size)]).to(device)
            pred = estimator.fit_output(tb["state"][idx], tb["actions"][idx], tb["t"][idx])[:, k]
            loss = loss + F.mse_loss(pred, estimator.fit_target(tb["reward"][idx]))
        loss = loss / len(tensors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if writer is not None and (step % 100 == 0 or step + 1 == steps):
            writer.add_scalar("losses/estimator_loss", loss.item(), step)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(
                f"fit step {step + 1}/{steps} | fit MSE {loss.item():.4f} | steps/s {(step + 1) / (time.time() - start):.0f}",
                flush=True,
            )
    estimator.eval()

    @torch.no_grad()
    def mse(k, idx):
        if len(idx) == 0:
            return float("nan")
        tb, i = tensors[k], torch.from_numpy(idx).to(device)
        return F.mse_loss(estimator(tb["state"][i], tb["actions"][i], tb["t"][i])[:, k], tb["reward"][i]).item()

    with torch.no_grad():  # which head is the minimum, over all collected transitions
        argmins = torch.cat([estimator(tb["state"], tb["actions"], tb["t"]).argmin(-1) for tb in tensors])
        min_share = torch.bincount(argmins, minlength=len(tensors)).float() / len(argmins)
    return {
        "mode": "offline",
        "train_mse": [mse(k, tr) for k, (tr, _) in enumerate(splits)],
        "val_mse": [mse(k, va) for k, (_, va) in enumerate(splits)],
        "reward_var": [float(np.var(d["reward"])) for d in data],
        "min_head_share": min_share.tolist(),
    }


def fit_offline(args, estimator, behaviour, window, lanes, configs, days_range, rng, device, writer):
    """--fit offline in stage 1's main block: --episodes-per-config episodes of every config (days drawn uniformly
    in days_range = [a, b)) with the epsilon-greedy behaviour policy (module, q_network), then fit_estimator.
    lanes: config -> its parallel envs. -> fit stats (fit_estimator's)."""
    (module, q_network), joint_coin = behaviour, not args.per_agent_coins  # released: one joint coin
    data, global_step, start_time = [], 0, time.time()
    for k, config in enumerate(configs):
        days = rng.integers(*days_range, args.episodes_per_config).tolist()
        d = collect(
            module,
            q_network,
            lanes[config],
            days,
            window,
            args.behaviour_epsilon,
            args.episode_steps,
            rng,
            device,
            joint_coin,
        )
        for ret in d["returns"]:
            global_step += len(d["reward"]) // len(d["returns"])
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/normalised_return", envs.normalised_return(ret), global_step)
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
        print(
            f"collected {config}: {len(d['returns'])} episodes, {len(d['reward'])} transitions | return "
            f"{d['returns'].mean():.1f} | reward mean {d['reward'].mean():.2f} std {d['reward'].std():.2f}",
            flush=True,
        )
        data.append(d)
    # Fit r_hat_k on env k's data (one head per environment)
    fit = fit_estimator(
        estimator,
        data,
        args.fit_steps,
        args.fit_batch_size,
        args.fit_learning_rate,
        args.val_fraction,
        rng,
        device,
        writer,
        args.log_every or 500,
    )
    for k, config in enumerate(configs):
        writer.add_scalar(f"losses/val_mse_{config}", fit["val_mse"][k], args.fit_steps)
        print(
            f"{config}: train MSE {fit['train_mse'][k]:.3f} | val MSE {fit['val_mse'][k]:.3f} | reward variance "
            f"{fit['reward_var'][k]:.3f} | min head on {100 * fit['min_head_share'][k]:.1f}% of transitions"
        )
    return fit
