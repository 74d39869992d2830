"""Run plumbing of the algos/ training scripts; the algorithms stay in the scripts.

A script adds a few calls::

    args = runs.parse_args(Args, __file__, check_args)  # tyro; --resume: the run's flags; every flag checked
    run = runs.Run(run_dir, args, __file__)              # runs/<run name>: args.json, TensorBoard (run.writer)
    ...                                                  # seeding, envs, networks, optimisers, buffer
    run.track(q_network=q_network, ..., rb=rb, rng=rng)  # --resume: all of it restored in place
    with run:                                            # Ctrl-C, the NaN guard, the writer closed at the end
        for episode in range(run.episode, args.total_episodes):
            ...
            if run.episode_end(episode + 1, global_step, episode_return, epsilon):  # progress, checkpoint
                break                                                                # --total-steps reached
    runs.save_model(run_dir, __file__, args, env_info, q_network=q_network, ...)

What lives here:
* the run flags (RunArgs) and the up-front checks of every count and frequency flag;
* the run folder: args.json and the TensorBoard writer (continued without duplicates on --resume);
* checkpoint.pt (every --checkpoint-every episodes, every --checkpoint-minutes, at the end, on Ctrl-C / SIGTERM),
  written atomically, with every training object, the RNG states and two counters: the episode and the env step
  (a script derives the rest from them). It loads with torch.load(weights_only=True): tensors and plain types only;
* --resume: bit for bit where the checkpoint was taken (CPU); checkpoints of the previous format are converted;
* the NaN guard: the scripts clip with clip_grad_norm_(..., error_if_nonfinite=True); a non-finite gradient norm
  (a NaN or inf loss, target or gradient) stops the run before the optimiser step, with one line, exit 3;
* the progress line (return, epsilon, env steps/s, gradient steps/s, time left) every --log-every episodes;
* model.pt (save_model / load_model): weights, args and env config, for eval.py; it also loads with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch

import envs
from envs import fail  # one error line naming the flag, exit 2

ROOT = os.path.dirname(os.path.abspath(__file__))
ALGOS = (
    "robust_vdn_rho",
    "robust_vdn_tv",
    "robust_qmix_rho",
    "robust_qmix_tv",
    "robust_qtran_rho",
    "robust_qtran_tv",
    "groupdr_vdn",
    "groupdr_qmix",
    "groupdr_qtran",
)  # the scripts a checkpoint may name (algos/<algo>.py)
EXIT_NONFINITE = 3  # the NaN guard stopped the run
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as a shell reports it


# ---------------------------------------------------------------------------------------------
# Run flags and their checks
# ---------------------------------------------------------------------------------------------
@dataclass
class RunArgs:
    """The run flags of every algos/ training script: its Args extends this class (GroupDR) or envs.EnvArgs
    (the six robust scripts; EnvArgs extends this one) with the algorithm's flags; tyro shows them all in --help."""

    exp_name: str = ""
    """the name of this experiment (default: the script's name)"""
    run_name: str = ""
    """run folder under runs/ (default: {env}__{exp_name}__{seed}__{unix time})"""
    seed: int = 1
    """seed of python, numpy, torch and the environment (training days / configs, exploration)"""
    device: str = "cpu"
    """torch device (cpu or cuda)"""
    torch_threads: int = 0
    """torch intra-op threads (0 = torch's default; 1 is fastest on a 2-core machine)"""
    fused: bool = True
    """agents' LSTMs and RMSprop in fused.py's C++ kernels (same equations; --no-fused: plain torch)"""
    save_model: bool = False
    """save weights, args and env config to runs/{run_name}/model.pt"""
    log_every: int = 10
    """print a progress line every this many episodes"""
    checkpoint_every: int = 50
    """write runs/{run_name}/checkpoint.pt every this many episodes, for --resume (0 = none by episodes; StarCraft default 0)"""
    checkpoint_minutes: float = 10.0
    """also write it at the end of an episode once this many minutes have passed since the last one (or this process's
    start), and at the end of training (0 = neither; Ctrl-C / SIGTERM always write one)"""
    resume: str = ""
    """continue the run in this folder (runs/<run name>) from its checkpoint.pt; flags left out come from it"""


# Count and frequency flags of the algos/ scripts -> the least accepted value (every field an Args
# has is checked, so one table serves all nine scripts), then the few real-valued ones.
COUNT_FLAGS = {
    "total_episodes": 1,
    "batch_size": 1,
    "buffer_size": 1,
    "window": 1,
    "hidden_dim": 1,
    "mixing_embed_dim": 1,
    "dual_hidden_dim": 1,
    "log_every": 1,
    "train_frequency": 1,
    "target_network_frequency": 1,
    "exploration_steps": 1,
    "eval_episodes": 1,
    "checkpoint_every": 0,
    "eval_every": 0,
    "total_steps": 0,
    "episode_steps": 0,
    "learning_starts": 0,
    "torch_threads": 0,
}
REAL_FLAGS = {
    "gamma": ("in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "learning_rate": ("> 0", lambda v: v > 0),
    "qtran_learning_rate": ("> 0", lambda v: v > 0),
    "dual_learning_rate": ("> 0", lambda v: v > 0),
    "max_grad_norm": (">= 0 (0 = no clip)", lambda v: v >= 0),
    "dual_max_grad_norm": (">= 0 (0 = no clip)", lambda v: v >= 0),
    "rmsprop_eps": (">= 0", lambda v: v >= 0),
    "start_e": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "end_e": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "eval_sigma": (">= 0", lambda v: v >= 0),
    "checkpoint_minutes": (">= 0 (0 = no checkpoints by time)", lambda v: v >= 0),
}


def check_counts(args) -> None:
    """Every count / frequency flag (and the real-valued ones above) of an algos/ script's Args, before
    anything is built or written: one line "--flag must be ... (got X)", then exit != 0."""
    for field, least in COUNT_FLAGS.items():
        value = getattr(args, field, least)
        if value < least:
            fail(f"--{field.replace('_', '-')} must be >= {least} (got {value})")
    for field, (accepted, ok) in REAL_FLAGS.items():
        if hasattr(args, field) and not ok(getattr(args, field)):
            fail(f"--{field.replace('_', '-')} must be {accepted} (got {getattr(args, field)})")
    if args.buffer_size <= args.window:  # sample() skips the W oldest slots once the buffer wraps
        fail(f"--buffer-size must be larger than --window (got {args.buffer_size} <= {args.window})")


def check_run_args(args) -> None:
    """The flags the six robust scripts share: --env, --train-config, --train-days and every count.
    One clear line naming the flag, then exit != 0."""
    try:
        envs.check_env_args(args.env, args.train_config or envs.default_config(args.env))
    except envs.EnvArgError as e:
        fail(str(e))
    lo, _, hi = args.train_days.partition(":")
    if not (lo.isdigit() and hi.isdigit() and int(lo) < int(hi)):
        fail(f"--train-days must look like a:b with integers a < b (got '{args.train_days}')")
    check_counts(args)


def choice_fields(cls) -> dict:
    """The Literal[...] fields of an Args class -> their accepted values."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is typing.Literal
    }


def check_choices(cls, argv) -> None:
    """A Literal flag given a value outside its choices: one line naming the flag and the choices (tyro's own
    message is a multi-line box), exit 2."""
    choices = {"--" + name.replace("_", "-"): values for name, values in choice_fields(cls).items()}
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag in choices:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value not in choices[flag]:
                fail(f"{flag} must be one of {', '.join(choices[flag])} (got '{value}')")


# Flags a resumed run may change (how long it runs, how often it logs or checkpoints, threads, output).
BUDGET_FLAGS = (
    "total_episodes",
    "total_steps",
    "checkpoint_every",
    "checkpoint_minutes",
    "log_every",
    "resume",
    "torch_threads",
    "save_model",
)


def _given_flags(argv, fields) -> set:
    """The Args fields a command line sets explicitly (--flag x, --flag=x, --no-flag)."""
    given = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            name = name[3:] if name not in fields and name.startswith("no_") else name
            given |= {name} & set(fields)
    return given


def parse_args(cls, script: str, check=None, argv=None):
    """tyro's Args from the command line (argv: sys.argv[1:]); with --resume runs/<name>, the flags left off the
    command line take that run's checkpoint values (a flag given with another value is refused in one line, except
    BUDGET_FLAGS, where the command line wins); then check(args), the script's own flag checks."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    check_choices(cls, argv)
    args = tyro.cli(cls, args=argv)
    args.exp_name = args.exp_name or os.path.basename(script)[: -len(".py")]
    if getattr(args, "resume", ""):  # (groupdr_estimator.py has no --resume)
        args.resume = os.path.normpath(args.resume)
        ckpt = read_run_checkpoint(args.resume, script)
        fields, saved = vars(args), ckpt["args"]
        given = _given_flags(argv, fields)
        for key in list(fields):
            if key not in saved or (key in BUDGET_FLAGS and (key in given or key == "resume")):
                continue
            if key in given and fields[key] != saved[key]:
                flag = "--" + key.replace("_", "-")
                fail(
                    f"{flag} {fields[key]} differs from the checkpoint's {flag} {saved[key]} "
                    f"({os.path.join(args.resume, 'checkpoint.pt')}); leave it out to continue with {saved[key]}, "
                    "or start a new run without --resume"
                )
            setattr(args, key, saved[key])
    if check is not None:
        check(args)
    return args


# ---------------------------------------------------------------------------------------------
# Checkpoint files: tensors and plain types only, so they load with torch.load(weights_only=True)
# ---------------------------------------------------------------------------------------------
RUN_CHECKPOINT_FORMAT = "drigm-run-checkpoint-v2"  # v1 (before 2026-12-02): numpy arrays, eight counters
MODEL_FORMATS = ("drigm-checkpoint-v1", "drigm-checkpoint-v2", "drigm-checkpoint-v3")
# v1 -> v2 DRQN parameter names (2026-12-02: the DRQN became named layers fc1 -> lstm -> fc_out, same tensors)
RENAMED = {
    "fc1_obs": "fc1.weight_obs",
    "fc1_table": "fc1.weight_onehot",
    "fc1_bias": "fc1.bias",
    "lstm_weight_ih": "lstm.weight_ih_l0",
    "lstm_weight_hh": "lstm.weight_hh_l0",
    "lstm_bias_ih": "lstm.bias_ih_l0",
    "lstm_bias_hh": "lstm.bias_hh_l0",
    "fc_out_weight": "fc_out.weight",
    "fc_out_bias": "fc_out.bias",
}
# The three numpy globals a v1 checkpoint's arrays need: numpy's array constructor, no code of ours or anyone's.
NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype] + [
    type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "uint32", "bool")
]


def safe_load(path: str, what: str, map_location="cpu"):
    """torch.load(weights_only=True) of a file of ours (numpy arrays of the previous format allowed); one line on failure."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        reason = str(e).strip().splitlines()[0] if isinstance(e, __import__("pickle").UnpicklingError) else type(e).__name__
        fail(f"{what}: cannot read '{path}' as a torch checkpoint of tensors and plain types ({reason[:160]})")


def rename_drqn(state: dict) -> dict:
    """A state dict with v1 DRQN names (drqn.fc1_obs, ...) -> today's (drqn.fc1.weight_obs, ...); others unchanged."""
    out = {}
    for key, value in state.items():
        head, _, last = key.rpartition(".")
        if last in RENAMED:
            key = f"{head}.{RENAMED[last]}" if head else RENAMED[last]
        out[key] = value
    return out


def _to_saved(obj):
    """numpy arrays -> tensors (weights_only-loadable), recursively through dicts, lists and tuples."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _to_saved(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_saved(v) for v in obj)
    return obj


def _state_of(obj):
    """What a checkpoint keeps of one training object."""
    if isinstance(obj, (list, tuple)):
        return [_state_of(o) for o in obj]
    if isinstance(obj, np.random.Generator):
        return obj.bit_generator.state  # plain dicts and Python ints
    if hasattr(obj, "state_dict"):  # modules and optimisers
        return obj.state_dict()
    return {k: _to_saved(v) for k, v in vars(obj).items() if isinstance(v, (np.ndarray, int, float))}  # a buffer


def _load_state(obj, state, name: str) -> None:
    if isinstance(obj, (list, tuple)):
        if len(obj) != len(state):
            raise ValueError(f"{name}: {len(state)} saved, {len(obj)} here")
        for i, (o, s) in enumerate(zip(obj, state)):
            _load_state(o, s, f"{name}[{i}]")
    elif isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state
    elif hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
    else:  # a replay buffer: every array with its shape and dtype, and its pointers
        here = {k: v for k, v in vars(obj).items() if isinstance(v, (np.ndarray, int, float))}
        state = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        bad = sorted(set(here) ^ set(state)) + [
            k
            for k in set(here) & set(state)
            if isinstance(here[k], np.ndarray) and (here[k].shape, here[k].dtype) != (state[k].shape, state[k].dtype)
        ]
        if bad:
            raise ValueError(f"{name}: {', '.join(bad)} differ")
        vars(obj).update(state)


def upgrade_run_checkpoint(ckpt: dict) -> dict:
    """A v1 run checkpoint (written before 2026-12-02) in today's layout, same numbers: DRQN keys renamed, the
    replay buffer's target-cache version taken from the old target_version counter, two counters kept."""
    counters = ckpt["counters"]
    state = {}
    for name, value in ckpt["state"].items():
        if isinstance(value, dict) and "value_version" in value:  # the buffer: V' cache of theta- version `version`
            value = {**value, "version": int(counters["target_version"])}
        elif isinstance(value, dict) and any(k.rpartition(".")[2] in RENAMED for k in value):
            value = rename_drqn(value)
        state[name] = value
    return {
        **ckpt,
        "format": RUN_CHECKPOINT_FORMAT,
        "state": state,
        "counters": {"episode": int(counters["episode"]), "global_step": int(counters["global_step"])},
    }


_READ = {}  # path -> the run checkpoint parse_args read (Run uses it again rather than reading the file twice)


def read_run_checkpoint(run_dir: str, script: str) -> dict:
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        fail(f"--resume: no checkpoint '{path}' (a run writes one every --checkpoint-every episodes and on Ctrl-C)")
    ckpt = safe_load(path, "--resume")
    if not isinstance(ckpt, dict) or ckpt.get("format") not in ("drigm-run-checkpoint-v1", RUN_CHECKPOINT_FORMAT):
        fail(f"--resume: '{path}' is not a training checkpoint written by algos/*.py")
    algo = os.path.basename(script)[: -len(".py")]
    if ckpt.get("algo") != algo:
        fail(f"--resume: '{path}' belongs to algos/{ckpt.get('algo')}.py, not algos/{algo}.py")
    if ckpt["format"] == "drigm-run-checkpoint-v1":
        ckpt = upgrade_run_checkpoint(ckpt)
    _READ[os.path.abspath(path)] = ckpt
    return ckpt


def write_json_atomic(path: str, payload) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)


def torch_setup(args) -> torch.device:
    """Deterministic algorithms (the same seed gives the same numbers on one CPU), no NaN-fill of every torch.empty
    (~1 ms a step), --torch-threads (0 = torch's default) -> the --device."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    return torch.device(args.device)


def checkpoint_clock() -> float:
    """Seconds on a monotonic clock: what --checkpoint-minutes measures (tests replace it)."""
    return time.monotonic()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class Run:
    """One training run of an algos/ script: its folder, writer, checkpoints, --resume, Ctrl-C and NaN guard.

    * checkpoints: at an episode end, every --checkpoint-every episodes, at the first episode end
      --checkpoint-minutes after the last checkpoint (or this process's start), at the end of training
      (if --checkpoint-minutes > 0) and on Ctrl-C / SIGTERM: runs/<run>/checkpoint.pt, written atomically,
      with every object passed to track(), the python / numpy / torch RNG states, the episode and the env step;
    * --resume: track() loads all of it back in place, so the run continues bit for bit (CPU);
    * Ctrl-C / SIGTERM: the current episode finishes, a checkpoint is written, the resume command printed,
      exit 130 / 143 (a second Ctrl-C stops at once, without a checkpoint);
    * NaN guard: leaving ``with run:`` on clip_grad_norm_'s non-finite error prints one line naming the episode
      and the last good checkpoint, exit 3 (no optimiser step was taken on it; model.pt is not written)."""

    def __init__(self, run_dir: str, args, script: str):
        """Create the run folder (after every flag check passed): args.json and the TensorBoard writer. A resumed
        run's writer drops what the interrupted process logged after its checkpoint (purge_step), so TensorBoard
        continues without duplicate points; likewise eval.jsonl (StarCraft evaluations)."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.args, self.script = run_dir, args, script
        self.path = os.path.join(run_dir, "checkpoint.pt")
        self.resumed = _READ.pop(os.path.abspath(self.path), None) if args.resume else None  # pop: track() frees it
        if args.resume and self.resumed is None:
            self.resumed = read_run_checkpoint(run_dir, script)
        self.episode, self.global_step = self.resumed["counters"].values() if self.resumed else (0, 0)
        if self.resumed is None:
            self.writer = SummaryWriter(run_dir)
            rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
        else:
            self.writer = SummaryWriter(run_dir, purge_step=self.global_step + 1)
            log = os.path.join(run_dir, "eval.jsonl")
            if os.path.isfile(log):
                with open(log) as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.global_step]
                with open(log + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(log + ".tmp", log)
        write_json_atomic(os.path.join(run_dir, "args.json"), vars(args))
        self.state, self.saved, self.stop_signal, self.noted = {}, None, None, set()
        self.previous_handlers = {}

    def track(self, **state) -> None:
        """Objects a checkpoint holds (networks, targets, optimisers, replay buffer, the script's numpy generator);
        may be called more than once. On --resume they, the RNGs and the counters are loaded back when the loop
        starts (``with run:``)."""
        self.state.update(state)

    def __enter__(self):
        """The loop starts: on --resume every tracked object is restored in place; the clocks and Ctrl-C start."""
        state = self.state
        if self.resumed is not None:
            try:
                if set(self.resumed["state"]) != set(state):
                    raise ValueError(f"holds {', '.join(sorted(self.resumed['state']))}")
                for name, obj in state.items():
                    _load_state(obj, self.resumed["state"][name], name)
            except (ValueError, RuntimeError, KeyError) as err:
                fail(f"--resume: {self.path} does not fit this run: {str(err).splitlines()[0]}")
            rng = self.resumed["rng"]
            random.setstate(rng["python"])
            numpy_state = rng["numpy"]
            np.random.set_state(
                tuple(v.numpy().astype(np.uint32) if isinstance(v, torch.Tensor) else v for v in numpy_state)
                if isinstance(numpy_state, (tuple, list))
                else numpy_state
            )
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None:
                torch.cuda.set_rng_state_all(rng["cuda"])
            self.saved = dict(self.resumed["counters"])
            print(f"resumed {self.path}: episode {self.episode}, env step {self.global_step}", flush=True)
            self.resumed = None  # free the replay buffer's copy
        self.last_save_time = checkpoint_clock()  # --checkpoint-minutes counts from here, then from each checkpoint
        self.start = self.stretch = (time.time(), self.global_step, self._updates(self.global_step), self._done())
        self.recent = []
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_SIGNAL:
                self.previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, kind, error, tb):
        if kind is RuntimeError and "non-finite" in str(error):  # clip_grad_norm_(..., error_if_nonfinite=True)
            self._stop_nonfinite("gradient norm (loss, target or gradient)")
        self.close()
        return False

    def episode_end(self, episode: int, global_step: int, episode_return: float, epsilon: float, info=None) -> bool:
        """After each episode: charts/episodic_return (building: also charts/normalised_return, Eq. 33; StarCraft:
        charts/battle_won from the last step's info), the progress line every --log-every episodes, a checkpoint when
        due, and after Ctrl-C / SIGTERM a checkpoint and exit. Returns True once the budget is spent
        (--total-episodes, --total-steps), i.e. the loop ends."""
        self.episode, self.global_step = episode, global_step
        self.writer.add_scalar("charts/episodic_return", episode_return, global_step)
        if getattr(self.args, "env", "building") == "building":
            self.writer.add_scalar("charts/normalised_return", envs.normalised_return(episode_return), global_step)
        if info is not None and "battle_won" in info:
            self.writer.add_scalar("charts/battle_won", float(info["battle_won"]), global_step)
        self.recent.append(episode_return)
        done = self._done() >= 1.0
        if episode % self.args.log_every == 0 or done:
            self._progress(epsilon, done)
        if self.stop_signal is not None or self.checkpoint_due(done):
            self.save()
        if self.stop_signal is not None:
            script = os.path.relpath(self.script)
            command = shlex.join(["python", self.script if script.startswith("..") else script, "--resume", self.run_dir])
            print(
                f"stopped by {signal.Signals(self.stop_signal).name} after episode {episode} "
                f"(env step {global_step}): checkpoint {self.path}; continue with: {command}",
                flush=True,
            )
            self.close()
            raise SystemExit(EXIT_SIGNAL[self.stop_signal])
        return done

    def sps(self, global_step: int) -> int:
        """Env steps per second since this process started training (charts/SPS)."""
        return int((global_step - self.start[1]) / max(time.time() - self.start[0], 1e-9))

    def log(self, global_step: int, epsilon: float, td_loss, q_taken, target, grad_norm, **more) -> None:
        """The logging block of every update (every 100 gradient steps): losses/td_loss, losses/q_taken_mean (the mean
        of Q_tot(h, a; theta) over the minibatch), losses/target_mean (of y), losses/grad_norm, losses/<name> for each
        of `more` (QTRAN: opt_loss, nopt_loss; GroupDR: r_tilde_mean, reward_mean), charts/SPS and charts/epsilon."""
        values = {"td_loss": td_loss, "q_taken_mean": q_taken.mean(), "target_mean": target.mean(), "grad_norm": grad_norm}
        for key, value in {**values, **more}.items():
            self.writer.add_scalar(f"losses/{key}", value.item(), global_step)
        self.writer.add_scalar("charts/SPS", self.sps(global_step), global_step)
        self.writer.add_scalar("charts/epsilon", epsilon, global_step)

    def log_dual(self, global_step: int, eta, floor, dual_loss) -> None:
        """TV scripts, with log(): robust/eta_mean, eta_min, eta_max (of the Q minibatch's eta in the target),
        robust/dual_loss and robust/eta_at_floor (the share of that eta at Eq. (10)'s floor), and note_eta_floor."""
        at_floor = (eta <= floor).float().mean()
        robust = {"eta_mean": eta.mean(), "eta_min": eta.min(), "eta_max": eta.max(), "dual_loss": dual_loss}
        for key, value in {**robust, "eta_at_floor": at_floor}.items():
            self.writer.add_scalar(f"robust/{key}", value.item(), global_step)
        self.note_eta_floor(at_floor.item(), global_step)

    def note_eta_floor(self, share: float, global_step: int) -> None:
        """TV scripts: one note when eta sat at Eq. (10)'s floor for more than 99% of a logged minibatch (the paper's
        linear dual + clamp with min V = 0: the TV target is then the nominal one). Printed once per process."""
        a = self.args
        if share <= 0.99 or not a.eta_clamp or a.worst_value != "zero" or "eta_floor" in self.noted:
            return
        self.noted.add("eta_floor")
        print(
            f"note: eta sat at its floor for {100 * share:.0f}% of a minibatch's samples (env step {global_step}): "
            "here the TV target equals the nominal one; see docs/robust_operators.md",
            flush=True,
        )

    # --- internals ------------------------------------------------------------------------
    def _updates(self, global_step: int) -> int:
        """Gradient steps done by env step global_step: one at every train_frequency-th step after learning_starts."""
        f, s = getattr(self.args, "train_frequency", 1), getattr(self.args, "learning_starts", 0)
        return max(global_step // f - s // f, 0)

    def _done(self) -> float:
        """Fraction of the run's budget (--total-episodes, --total-steps if set) done."""
        a = self.args
        steps = self.global_step / a.total_steps if getattr(a, "total_steps", 0) else 0.0
        return max(self.episode / a.total_episodes, steps)

    def _progress(self, epsilon: float, last: bool) -> None:
        now, (t0, steps0, updates0, _) = time.time(), self.stretch
        done, updates = self._done(), self._updates(self.global_step)
        left = (now - self.start[0]) * (1 - done) / max(done - self.start[3], 1e-9)
        a = self.args  # the budgets: episodes, and env steps where --total-steps is set (StarCraft: 1M steps)
        steps = f" | step {self.global_step}/{a.total_steps}" if getattr(a, "total_steps", 0) else ""
        print(
            f"episode {self.episode}/{a.total_episodes}{steps} | return {np.mean(self.recent):.1f} "
            f"| epsilon {epsilon:.3f} | SPS {(self.global_step - steps0) / max(now - t0, 1e-9):.0f} "
            f"| updates/s {(updates - updates0) / max(now - t0, 1e-9):.1f} | left {left / 60:.1f} min",
            flush=True,
        )
        self.stretch, self.recent = (now, self.global_step, updates, done), []

    def checkpoint_due(self, done: bool) -> bool:
        """Whether this episode end writes a checkpoint (Ctrl-C / SIGTERM aside): every --checkpoint-every
        episodes (0 = never by episodes), or, with --checkpoint-minutes M > 0, once M minutes have passed since
        the last checkpoint (or since this process started) and at the end of training (a finished run can be
        extended with --resume --total-steps). Building: every 50 episodes (~2 min); StarCraft (default
        --checkpoint-every 0): every 10 minutes, not every few seconds of short episodes."""
        every, minutes = self.args.checkpoint_every, getattr(self.args, "checkpoint_minutes", 0.0)
        if every > 0 and self.episode % every == 0:
            return True
        if minutes <= 0:
            return False
        return checkpoint_clock() - self.last_save_time >= 60.0 * minutes or done

    def save(self) -> None:
        """checkpoint.pt, atomically: a temporary file, fsync, then os.replace over the previous one."""
        bad = [
            name
            for name, obj in self.state.items()
            if isinstance(obj, torch.nn.Module) and not all(t.isfinite().all() for t in obj.state_dict().values())
        ]
        if bad:
            self._stop_nonfinite(f"weights of {', '.join(bad)}")
        self.writer.flush()  # everything logged up to this step is on disk before the checkpoint says so
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        rng = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }
        counters = {"episode": self.episode, "global_step": self.global_step}
        checkpoint = {
            "format": RUN_CHECKPOINT_FORMAT,
            "algo": os.path.basename(self.script)[: -len(".py")],
            "args": dict(vars(self.args)),
            "counters": counters,
            "state": {name: _state_of(obj) for name, obj in self.state.items()},
            "rng": rng,
        }
        with open(self.path + ".tmp", "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.path + ".tmp", self.path)
        self.saved = counters
        self.last_save_time = checkpoint_clock()

    def _on_signal(self, signum, frame):
        """First Ctrl-C / SIGTERM: stop at the end of this episode; the next one acts as usual."""
        self.stop_signal = signum
        self._restore_handlers()

    def _restore_handlers(self):
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        self.previous_handlers = {}

    def _stop_nonfinite(self, what: str):
        c = self.saved
        last = (
            f"last good checkpoint {self.path} (episode {c['episode']}, env step {c['global_step']})"
            if c
            else "no checkpoint written yet"
        )
        print(
            f"error: non-finite {what} in episode {self.episode + 1} (after env step {self.global_step} at the "
            f"last episode end): run stopped, model.pt not written; {last}",
            file=sys.stderr,
            flush=True,
        )
        self.close()
        raise SystemExit(EXIT_NONFINITE)

    def close(self) -> None:
        """TensorBoard file closed, the previous signal handlers back."""
        self._restore_handlers()
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# model.pt: what eval.py reads
# ---------------------------------------------------------------------------------------------
def save_model(run_dir: str, script: str, args, env, config: str = "", **parts) -> str:
    """Write run_dir/model.pt atomically (.tmp, then rename): algo (the script's name; load_model imports
    algos/<algo>.py for the network classes), args, the task (--env, config: --train-config unless given, and the
    sizes of env) and parts (modules as state dicts). Prints its path."""
    path = os.path.join(run_dir, "model.pt")
    sizes = ("n_agents", "n_actions", "obs_dim", "state_dim")
    env_info = (
        env
        if isinstance(env, dict)
        else {"env": args.env, "config": config or args.train_config, **{k: getattr(env, k) for k in sizes}}
    )
    bad = [
        k
        for k, v in parts.items()
        if isinstance(v, torch.nn.Module) and not all(t.isfinite().all() for t in v.state_dict().values())
    ]
    if bad:  # the NaN guard stops a diverging run before this; never write such weights
        print(f"error: non-finite weights in {', '.join(bad)}; {path} not written", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE)
    checkpoint = {
        "format": MODEL_FORMATS[-1],
        "algo": os.path.basename(script)[: -len(".py")],
        "args": dict(vars(args)),
        "env": env_info,
        **{k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in parts.items()},
    }
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"model saved to {path}")
    return path


def load_model(path: str, flag: str = "--checkpoints", map_location="cpu") -> dict:
    """model.pt -> its dict, with torch.load(weights_only=True) (no code runs); v2 (before 2026-12-02) DRQN names
    converted on load. The algorithm it names must be one of the nine scripts. One error line for any bad file."""
    if not os.path.isfile(path):
        fail(f"{flag}: no such file '{path}'")
    ckpt = safe_load(path, flag, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in MODEL_FORMATS:
        fail(f"{flag}: '{path}' is not a checkpoint written by algos/*.py --save-model")
    if ckpt.get("algo") not in ALGOS:
        fail(f"{flag}: '{path}' names algorithm '{ckpt.get('algo')}'; accepted: {', '.join(ALGOS)}")
    if ckpt["format"] == "drigm-checkpoint-v2":
        ckpt = {**ckpt, "format": MODEL_FORMATS[-1], "q_network": rename_drqn(ckpt["q_network"])}
    return ckpt
