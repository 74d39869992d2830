"""Run a grid of training runs, evaluate every checkpoint, write docs/results/ and docs/results.md.

    python experiments/sweep.py experiments/paper_tables.toml                 # local pool, one run per core
    python experiments/sweep.py experiments/paper_tables.toml --backend ray   # a local Ray started for the sweep
    python experiments/sweep.py experiments/paper_tables.toml --backend ray --address auto   # an existing cluster

A grid file (TOML) lists methods: a script, its flags, rho values and seeds (experiments/paper_tables.toml
explains the format). Every (method, rho, seed) is one job, run in a subprocess with one torch thread:
  1. train: python <script> <defaults.flags> <flags> --rho R --seed S --run-name <grid>/<method>__rho<R>__seed<S>
     (if runs/<run name>/checkpoint.pt exists and model.pt does not, the run continues with --resume);
  2. evaluate model.pt with eval.py's protocols ([eval] protocols, default paper-tables, climate, season);
  3. write <results-dir>/<grid>/<run>.json: per-config normalised returns, the training curve, the command.
Resumable: a job whose result JSON exists is skipped, so a killed sweep started again finishes the grid
without redoing finished runs. A failed job is recorded in <results-dir>/<grid>/failed/<run>.json with its
error and the other jobs go on (it is retried on the next start). At the end experiments/report.py writes
the report (docs/results.md). Each job only needs the repository at the same path and a shared runs/
folder, so on a Ray cluster the driver collects the small result payloads and writes them itself.

Stages: dependent jobs (e.g. GroupDR: behaviour policy -> reward estimator -> the GroupDR Q-learning runs).
A [stages.<name>] table is one run that other jobs need as input:
    [stages.<name>]
    script = "algos/..."         # required
    flags = [...]                # its complete flags ([defaults] flags are NOT added to a stage)
    seed = 1                     # default 1
    output = "model.pt"          # the file it writes in runs/<grid>/<name>/ (default model.pt); done = it exists
    needs = { "--flag" = "<other stage>" }   # optional: inputs from earlier stages
    minutes = 30                 # optional: expected training minutes on one core (--deadline)
A stage is trained (python <script> <flags> <needs flags> --seed S --run-name <grid>/<name>, with --resume
when runs/<grid>/<name>/checkpoint.pt exists and its output does not), never evaluated, and writes no
result JSON; each build appends a record to <results-dir>/<grid>/stages/<name>.json (the sha256 of the
output's tensors, seconds, commit, machine), so builds of different sessions can be compared. A method table (or a stage) with `needs = { "--estimator-checkpoint" = "<stage>" }` gets
`--estimator-checkpoint runs/<grid>/<stage>/<output>` added to its flags and starts only once that file
exists; if the stage fails, its dependents are recorded as failed without running. A job whose model.pt
exists already (trained, only evaluation left) needs nothing. --only <method> also runs the stages it needs.
Jobs start in grid order as soon as their inputs exist: the stages (in dependency order), then seed 1 of
every method, then seed 2, ... A method whose script has no --rho (GroupDR) sets `rho_flag = false`: its
runs keep the `rho` of the table in their names and results (e.g. rho = [0]) and no --rho is passed.

--deadline HH:MM (or +MINUTES): start no job that would not finish by then, e.g. the end of a working session
whose processes are stopped with it. A job's expected minutes are 1.1 x the median train_seconds of the
earlier results of its script (all its methods) + 3 for evaluation, else the grid's `minutes` of its table,
else --unknown-minutes; the first job in grid order that fits is started, the others wait for the next start
(not failed). --dry-run --deadline ... shows the estimates.

StarCraft grids set `[eval] protocols = ["starcraft"]`: the result is the win-rate curve the run logged while
training (runs/<run>/eval.jsonl, clean and noisy greedy episodes every --eval-every env steps) and its last
round; the report is experiments/starcraft_report.py's docs/results_<grid>.md (docs/results.md is the building
report's). A job reading stage outputs records the
sha256 of their tensors under "inputs" (runs of different sessions that read the same estimator hash the same).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]  # envs, runs; report
import envs
from runs import write_json_atomic

BUILDING_PROTOCOLS = ("paper-tables", "climate", "season", "climate-season")
PROTOCOLS = BUILDING_PROTOCOLS + ("starcraft",)  # starcraft: the win rates the run logged to eval.jsonl
CURVE_BIN = 10  # training curve: mean normalised return per this many episodes


@dataclass
class Args:
    grid: tyro.conf.Positional[str]
    """the grid file (TOML), e.g. experiments/paper_tables.toml"""
    backend: str = "local"
    """local (a pool of subprocesses) or ray"""
    workers: int = 0
    """jobs at a time (0 = the number of cores); with Ray, the CPUs of the local Ray started for the sweep"""
    address: str = ""
    """ray: address of an existing cluster (e.g. auto or ray://host:10001); empty = start a local Ray"""
    workdir: str = ROOT
    """folder whose runs/ holds the training runs (the scripts write runs/<run name>/ under it)"""
    results_dir: str = os.path.join(ROOT, "docs", "results")
    """where the per-run result JSON files go (<results-dir>/<grid name>/<run>.json)"""
    only: str = ""
    """comma-separated method names to run (default: all methods of the grid)"""
    train: bool = True
    """train runs without model.pt (--no-train: only evaluate the runs that have finished training)"""
    report: bool = True
    """write the report (experiments/report.py) when the grid is done"""
    dry_run: bool = False
    """print the jobs and their state, run nothing"""
    deadline: str = ""
    """start no job that would not finish by then: HH:MM (local time, the next such time) or +MINUTES from
    now; empty = no limit. A job's expected minutes come from earlier results (--dry-run shows them)"""
    unknown_minutes: float = 60.0
    """--deadline: expected training minutes of a job with no earlier result of its script"""


@dataclass
class Job:
    grid: str
    method: str
    script: str
    flags: list[str]
    rho: float
    seed: int
    protocols: list[str]
    eval_steps: int = 0
    paper: str = ""
    rho_flag: bool = True  # pass --rho (false: the script has none, e.g. GroupDR)
    needs: list[str] = field(default_factory=list)  # the stages whose outputs this job reads
    need_files: list[str] = field(default_factory=list)  # ... and their output files (runs/<grid>/<stage>/<output>)
    stage: bool = False  # a [stages.<name>] job: trained, not evaluated; done when runs/<run>/<output> exists
    output: str = ""  # a stage's output file in its run folder
    minutes: float = 0.0  # the grid's expected training minutes (--deadline; 0 = none given)
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.method if self.stage else f"{self.method}__rho{float(self.rho)!r}__seed{self.seed}"

    @property
    def run_name(self) -> str:
        return f"{self.grid}/{self.name}"

    def target(self, workdir: str) -> str:
        """The file training writes: a stage's output, a method run's model.pt."""
        return os.path.join(workdir, "runs", self.run_name, self.output if self.stage else "model.pt")

    def train_command(self, resume: bool) -> list[str]:
        rho = ["--rho", repr(float(self.rho))] if self.rho_flag and not self.stage else []
        cmd = [
            sys.executable,
            os.path.join(ROOT, self.script),
            *self.flags,
            *rho,
            "--seed",
            str(self.seed),
            "--run-name",
            self.run_name,
        ]
        return cmd + (["--resume", os.path.join("runs", self.run_name)] if resume else [])


def load_grid(path: str) -> tuple[str, list[Job]]:
    """Grid file -> (grid name, jobs); one error line for anything malformed."""
    if not os.path.isfile(path):
        envs.fail(f"grid: no such file '{path}'")
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        envs.fail(f"grid: '{path}' is not valid TOML ({e})")
    name = os.path.splitext(os.path.basename(path))[0]
    defaults, methods, stage_specs = spec.get("defaults", {}), spec.get("methods", {}), spec.get("stages", {})
    ev = spec.get("eval", {})
    protocols = ev.get("protocols", ["paper-tables", "climate", "season"])
    for p in protocols:
        if p not in PROTOCOLS:
            envs.fail(f"grid: [eval] protocols '{p}' is unknown; accepted: {', '.join(PROTOCOLS)}")
    if not methods:
        envs.fail(f"grid: '{path}' has no [methods.<name>] tables")
    stages = load_stages(name, stage_specs, set(methods))
    jobs = []
    for method, m in methods.items():
        for key in ("script", "rho", "seeds"):
            if key not in m:
                envs.fail(f"grid: method '{method}' needs '{key}' (script, flags, rho, seeds)")
        if not os.path.isfile(os.path.join(ROOT, m["script"])):
            envs.fail(f"grid: method '{method}': no script '{m['script']}'")
        unknown = set(m) - METHOD_KEYS
        if unknown:
            envs.fail(f"grid: method '{method}': unknown keys {sorted(unknown)}; accepted: {', '.join(METHOD_KEYS_ORDER)}")
        needs, need_flags = _needs(f"method '{method}'", m.get("needs", {}), {s.name: s for s in stages})
        flags = [str(x) for x in defaults.get("flags", []) + m.get("flags", [])] + need_flags
        for rho in m["rho"]:
            for seed in m["seeds"]:
                jobs.append(
                    Job(
                        name,
                        method,
                        m["script"],
                        flags,
                        float(rho),
                        int(seed),
                        protocols,
                        int(ev.get("episode_steps", 0)),
                        m.get("paper", ""),
                        bool(m.get("rho_flag", True)),
                        needs,
                        need_flags[1::2],
                        minutes=_minutes(f"method '{method}'", m),
                    )
                )
    jobs.sort(key=lambda j: j.seed)  # stable: seed 1 of every method first (a learning check), then seed 2, ...
    return name, stages + jobs


METHOD_KEYS_ORDER = ("script", "flags", "rho", "seeds", "paper", "rho_flag", "needs", "minutes")
METHOD_KEYS = set(METHOD_KEYS_ORDER)
STAGE_KEYS_ORDER = ("script", "flags", "seed", "output", "needs", "minutes")


def _minutes(owner: str, table: dict) -> float:
    """A table's `minutes` (expected training minutes, --deadline): a positive number, or 0 when absent."""
    m = table.get("minutes", 0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (0 < m < float("inf") or "minutes" not in table):
        envs.fail(f"grid: {owner}: minutes must be a positive number of minutes (got {m!r})")
    return float(m)


def _check_needs(owner: str, needs, stage_names) -> dict:
    """needs must be a table { "--flag" = "<stage>" } naming stages of the grid."""
    if not isinstance(needs, dict):
        envs.fail(f'grid: {owner}: needs must be a table {{ "--flag" = "<stage>" }} (got {needs!r})')
    for flag, stage in needs.items():
        if not flag.startswith("--"):
            envs.fail(f"grid: {owner}: needs key '{flag}' is not a flag (e.g. \"--estimator-checkpoint\")")
        if stage not in stage_names:
            envs.fail(
                f"grid: {owner}: needs stage '{stage}', which has no [stages.{stage}] table"
                + (f"; stages: {', '.join(stage_names)}" if stage_names else "")
            )
    return needs


def _needs(owner: str, needs, stages: dict) -> tuple[list[str], list[str]]:
    """needs = { "--flag" = "<stage>" } -> (stage names, ["--flag", "runs/<grid>/<stage>/<output>", ...])."""
    _check_needs(owner, needs, list(stages))
    flags = []
    for flag, stage in needs.items():
        flags += [flag, os.path.join("runs", stages[stage].run_name, stages[stage].output)]
    return list(needs.values()), flags


def load_stages(grid: str, specs: dict, method_names: set) -> list[Job]:
    """[stages.<name>] tables -> stage jobs in dependency order (stable in file order); one error line for
    anything malformed (a missing script, unknown keys or stages, a cycle, a name that is also a method's)."""
    for stage, st in specs.items():
        if not isinstance(st, dict) or "script" not in st:
            envs.fail(f"grid: stage '{stage}' needs 'script' ({', '.join(STAGE_KEYS_ORDER)})")
        unknown = set(st) - set(STAGE_KEYS_ORDER)
        if unknown:
            envs.fail(f"grid: stage '{stage}': unknown keys {sorted(unknown)}; accepted: {', '.join(STAGE_KEYS_ORDER)}")
        if not os.path.isfile(os.path.join(ROOT, st["script"])):
            envs.fail(f"grid: stage '{stage}': no script '{st['script']}'")
        if stage in method_names:
            envs.fail(f"grid: stage '{stage}' has the name of a method; give it another")
        _check_needs(f"stage '{stage}'", st.get("needs", {}), list(specs))
    order: list[str] = []
    while len(order) < len(specs):
        ready = [s for s in specs if s not in order and all(d in order for d in specs[s].get("needs", {}).values())]
        if not ready:
            envs.fail(f"grid: stages {', '.join(s for s in specs if s not in order)} need each other (a cycle)")
        order += ready
    jobs: dict[str, Job] = {}
    for stage in order:
        st = specs[stage]
        needs, need_flags = _needs(f"stage '{stage}'", st.get("needs", {}), jobs)
        jobs[stage] = Job(
            grid,
            stage,
            st["script"],
            [str(x) for x in st.get("flags", [])] + need_flags,
            0.0,
            int(st.get("seed", 1)),
            [],
            needs=needs,
            need_files=need_flags[1::2],
            minutes=_minutes(f"stage '{stage}'", st),
            stage=True,
            output=str(st.get("output", "model.pt")),
        )
    return list(jobs.values())


def training_curve(run_dir: str) -> dict:
    """charts/normalised_return (building) or charts/episodic_return from TensorBoard, CURVE_BIN-episode means."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    tag = "charts/normalised_return" if "charts/normalised_return" in tags else "charts/episodic_return"
    events = acc.Scalars(tag) if tag in tags else []
    values = [e.value for e in events]
    bins = [values[i : i + CURVE_BIN] for i in range(0, len(values), CURVE_BIN)]
    return {
        "tag": tag,
        "episodes": [min(len(values), (i + 1) * CURVE_BIN) for i in range(len(bins))],
        "env_steps": [events[min(len(values), (i + 1) * CURVE_BIN) - 1].step for i in range(len(bins))],
        "mean": [sum(b) / len(b) for b in bins],
        "wall_seconds": round(training_seconds([e.wall_time for e in events]), 1),
    }


PAUSE_SECONDS = 600.0  # a gap this long between two consecutive episodes is no training (see training_seconds)


def training_seconds(wall_times: list[float]) -> float:
    """Seconds a run spent training, from its episodes' TensorBoard wall times: the sum of the gaps between
    consecutive episodes, leaving out gaps over PAUSE_SECONDS (a resumed run's time between its checkpoint and the
    restart, possibly another session; a paused worker). The longest gap inside one process is an evaluation round
    or a checkpoint (seconds to a minute), so an uninterrupted run gets its first-to-last episode time, as before."""
    return sum(b - a for a, b in itertools.pairwise(wall_times) if 0.0 <= b - a <= PAUSE_SECONDS)


def run_job(job: Job, workdir: str) -> dict:
    """Train (or continue) then evaluate one run; returns the result payload (raises on failure). A stage is
    only trained: -> its record (output file relative to workdir, the sha256 of its tensors, the seconds this
    start trained, commit, machine, command), which the sweep appends to <results>/<grid>/stages/<stage>.json."""
    run_dir = os.path.join(workdir, "runs", job.run_name)
    model, env = job.target(workdir), dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0, trained_now, resumed = time.time(), not os.path.isfile(model), False
    if not os.path.isfile(model):
        resume = resumed = os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
        cmd = job.train_command(resume)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "commit.txt"), "a") as f:  # the code that trained it (one line per start)
            f.write(_git_commit() + "\n")
        with open(os.path.join(run_dir, "machine.txt"), "a") as f:  # and the machine (one JSON line per start)
            f.write(json.dumps(machine()) + "\n")
        with open(os.path.join(workdir, "runs", job.grid, f"{job.name}.log"), "a") as log:
            proc = subprocess.run(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        if proc.returncode != 0 or not os.path.isfile(model):
            raise RuntimeError(
                f"training exited {proc.returncode} (log: runs/{job.grid}/{job.name}.log): "
                + _tail(os.path.join(workdir, "runs", job.grid, f"{job.name}.log"))
            )
    if job.stage:
        return {
            "stage": job.name,
            "output": os.path.relpath(model, workdir),
            "tensor_hash": tensor_hash(model),
            "train_seconds": round(time.time() - t0, 1) if trained_now else None,  # this start's, resumed or not
            "resumed": resumed,  # continued a checkpoint: train_seconds is not the whole build's
            "commit": _trained_with(run_dir),
            "machine": _trained_on(run_dir),
            "command": " ".join(["python", job.script, *job.flags, "--seed", str(job.seed)]),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    results, payload = {}, {}
    for protocol in [p for p in job.protocols if p in BUILDING_PROTOCOLS]:
        out = os.path.join(run_dir, f"eval_{protocol}.json")
        cmd = [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--checkpoints",
            model,
            "--protocol",
            protocol,
            "--out",
            out,
            "--torch-threads",
            "1",
        ] + (["--episode-steps", str(job.eval_steps)] if job.eval_steps else [])
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"eval.py --protocol {protocol} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}"
            )
        with open(out) as f:
            payload = json.load(f)
        results[protocol] = {e["config"]: sum(e["normalised"]) / len(e["normalised"]) for e in payload["episodes"]}
    with open(os.path.join(run_dir, "args.json")) as f:
        run_args = json.load(f)
    curve = training_curve(run_dir)
    extra = {"starcraft": starcraft_curve(run_dir)} if "starcraft" in job.protocols else {}
    extra.update(
        {"inputs": {n: tensor_hash(os.path.join(workdir, p)) for n, p in zip(job.needs, job.need_files)}} if job.needs else {}
    )
    return {
        "grid": job.grid,
        "method": job.method,
        "paper": job.paper,
        "script": job.script,
        "flags": job.flags,
        "rho": job.rho,
        "seed": job.seed,
        "run_name": job.run_name,
        "command": " ".join(
            ["python", job.script, *job.flags, *(["--rho", repr(job.rho)] if job.rho_flag else []), "--seed", str(job.seed)]
        ),
        "args": run_args,
        "commit": _trained_with(run_dir),
        "machine": _trained_on(run_dir),
        **({"eval_days": payload["days"], "normalised_return": results} if payload else {}),
        **extra,
        "curve": curve,
        "train_seconds": curve["wall_seconds"],  # first to last episode, from TensorBoard's wall times, pauses left out
    }


def starcraft_curve(run_dir: str) -> dict:
    """The evaluation rounds a StarCraft run logged while training (runs/<run>/eval.jsonl: clean and noisy
    greedy episodes every --eval-every env steps, Sec. 5.2) as lists against env steps, and its last round."""
    path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.isfile(path):
        raise RuntimeError(f"protocol starcraft: {path} is missing (train with --env smax or smac and --eval-every > 0)")
    with open(path) as f:
        points = [json.loads(line) for line in f if line.strip()]
    if not points:
        raise RuntimeError(f"protocol starcraft: {path} holds no evaluation round (is --eval-every below the budget?)")
    keys = ("win_rate_clean", "win_rate_noisy", "return_clean", "return_noisy")
    return {"env_steps": [p["step"] for p in points], **{k: [p[k] for p in points] for k in keys}, "final": points[-1]}


def tensor_hash(path: str) -> str:
    """sha256 of the tensors of a checkpoint (keys sorted; its other values, e.g. wall times, left out): two
    files holding the same weights hash the same, so runs of different sessions show whether they read the same
    stage output (e.g. the one GroupDR estimator of a grid's seeds)."""
    import hashlib

    import torch

    h = hashlib.sha256()

    def walk(key: str, value) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{key}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    try:
        walk("", torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - a hash is a record, not a reason to fail the run
        return f"unreadable ({type(e).__name__})"
    return h.hexdigest()


def _tail(path: str, n: int = 300) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(f.read()[-n:].strip().splitlines()[-3:])


def _trained_with(run_dir: str) -> str:
    """The commit(s) the run was trained with (runs/<run>/commit.txt, written when the sweep starts training)."""
    path = os.path.join(run_dir, "commit.txt")
    if not os.path.isfile(path):
        return "unknown"
    with open(path) as f:
        return ",".join(dict.fromkeys(line.strip() for line in f if line.strip()))


def machine() -> dict:
    """What the numbers depend on beyond the code: the CPU model, torch's version, the torch threads of a job."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "torch": torch.__version__, "torch_threads": 1, "python": platform.python_version()}


def _trained_on(run_dir: str) -> list[dict]:
    """The machine(s) the run was trained on (runs/<run>/machine.txt; empty for runs started before it existed)."""
    path = os.path.join(run_dir, "machine.txt")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in dict.fromkeys(line.strip() for line in f if line.strip())]


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def parse_deadline(text: str, now: float) -> float | None:
    """--deadline: HH:MM (local time; the next such time) or +MINUTES -> epoch seconds; empty -> None."""
    if not text:
        return None
    try:
        if text.startswith("+"):
            minutes = float(text[1:])
            if not (0 <= minutes < float("inf")):
                raise ValueError
            return now + 60 * minutes
        hh, mm = (int(x) for x in text.split(":"))
        if not (0 <= hh < 24 and 0 <= mm < 60):
            raise ValueError
    except ValueError:
        envs.fail(f"--deadline must be HH:MM (local time) or +MINUTES (got '{text}')")
    t = time.localtime(now)
    at = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, hh, mm, 0, 0, 0, -1))
    return at if at > now else at + 86400


def expected_minutes(jobs: list[Job], out_dir: str, unknown: float) -> dict[str, float]:
    """A job's expected minutes (training + evaluation) for --deadline: the median train_seconds of the earlier
    results of its script in out_dir, all its methods pooled (a stage: its earlier whole builds recorded in
    out_dir/stages/), plus 10% and 3 minutes for evaluation and start; else the grid's `minutes` for it;
    else `unknown`. Pooled by script, not by method: the methods of one script differ in flags that do not
    change the cost of a run (rho, the optimiser, the coins), and a method's first result, often made beside
    other work, then does not decide its estimate alone (measured: QMIX-rho seed 1 took 115 minutes beside
    tests, the same script's other runs 20-52). A script with fewer than MIN_OWN_RESULTS results is estimated from
    all the grid's results (its runs share one environment and budget): measured, GroupDR VDN's only result, 100
    minutes beside four other processes, kept its four other seeds out of every deadline sweep, where every other
    building run took 19-31 minutes."""
    import statistics

    seconds: dict[tuple[str, str], list[float]] = {}
    if os.path.isdir(out_dir):
        for name in sorted(os.listdir(out_dir)):
            if name.endswith(".json"):
                with open(os.path.join(out_dir, name)) as f:
                    r = json.load(f)
                if r.get("train_seconds") is not None:
                    seconds.setdefault(("script", r.get("script", "")), []).append(r["train_seconds"])
    stages_dir = os.path.join(out_dir, "stages")
    for name in sorted(os.listdir(stages_dir)) if os.path.isdir(stages_dir) else []:
        with open(os.path.join(stages_dir, name)) as f:
            builds = json.load(f)["builds"]
        whole = [b["train_seconds"] for b in builds if b.get("train_seconds") is not None and not b.get("resumed")]
        if whole:
            seconds[("stage", name[: -len(".json")])] = whole
    grid_wide = [x for (kind, _), xs in seconds.items() if kind == "script" for x in xs]
    out = {}
    for j in jobs:
        known = seconds.get(("stage", j.name)) if j.stage else seconds.get(("script", j.script))
        if known and not j.stage and len(known) < MIN_OWN_RESULTS:  # too few of its own: with the grid's results
            known = grid_wide
        out[j.name] = 1.1 * statistics.median(known) / 60 + 3 if known else j.minutes or unknown
    return out


MIN_OWN_RESULTS = 3  # a script with fewer results is estimated from all the grid's results (expected_minutes)


def main(args: Args) -> int:
    if args.backend not in ("local", "ray"):
        envs.fail(f"--backend must be one of local, ray (got '{args.backend}')")
    if args.workers < 0:
        envs.fail(f"--workers must be >= 0 (got {args.workers}; 0 = one per core)")
    if not args.unknown_minutes > 0:
        envs.fail(f"--unknown-minutes must be > 0 (got {args.unknown_minutes})")
    deadline = parse_deadline(args.deadline, time.time())
    grid, jobs = load_grid(args.grid)
    stage_of = {j.name: j for j in jobs if j.stage}
    if args.only:
        wanted = set(args.only.split(","))
        missing = wanted - {j.method for j in jobs}
        if missing:
            envs.fail(
                f"--only: no method {sorted(missing)} in {args.grid}; accepted: {', '.join(sorted({j.method for j in jobs}))}"
            )
        needed, stack = set(), [n for j in jobs if j.method in wanted for n in j.needs]
        while stack:  # the stages the chosen methods need, and theirs
            name = stack.pop()
            if name not in needed:
                needed.add(name)
                stack += stage_of[name].needs
        jobs = [j for j in jobs if j.method in wanted or j.name in needed]
    runs, stages = [j for j in jobs if not j.stage], [j for j in jobs if j.stage]
    out_dir, failed_dir = os.path.join(args.results_dir, grid), os.path.join(args.results_dir, grid, "failed")
    os.makedirs(os.path.join(args.workdir, "runs", grid), exist_ok=True)
    result = {j.name: os.path.join(out_dir, f"{j.name}.json") for j in runs}
    stage_record = {j.name: os.path.join(out_dir, "stages", f"{j.name}.json") for j in stages}

    def stage_builds(job: Job) -> list[dict]:
        if not os.path.isfile(stage_record[job.name]):
            return []
        with open(stage_record[job.name]) as f:
            return json.load(f)["builds"]

    def trained(job: Job) -> bool:
        return os.path.isfile(job.target(args.workdir))  # model.pt of a run, the output of a stage

    todo_runs = [j for j in runs if not os.path.isfile(result[j.name])]
    todo_stages = [j for j in stages if not trained(j)]
    n_done, n_untrained = len(runs) - len(todo_runs), 0
    if not args.train:  # nothing is trained: no stage runs, and only the trained runs are evaluated
        ready = [j for j in todo_runs if trained(j)]
        todo_runs, todo_stages, n_untrained = ready, [], len(todo_runs) - len(ready)
    todo = todo_stages + todo_runs
    workers = args.workers or os.cpu_count() or 1
    minutes = expected_minutes(todo, out_dir, args.unknown_minutes)

    def fits(job: Job) -> bool:
        """--deadline: the job's expected minutes end before it (a trained run has only its evaluation left)."""
        left = 3.0 if not job.stage and trained(job) else minutes[job.name]
        return deadline is None or time.time() + 60 * left <= deadline

    print(
        f"grid {grid}: {len(runs)} runs, {n_done} already done, {len(todo_runs)} to run"
        + (f", {n_untrained} not trained yet (--no-train)" if n_untrained else "")
        + (f"; {len(stages)} stages, {len(todo_stages)} to run" if stages else "")
        + f" ({args.backend}, {workers if not args.address else 'cluster'} at a time)"
        + (f"; deadline {time.strftime('%Y-%m-%d %H:%M', time.localtime(deadline))}" if deadline else ""),
        flush=True,
    )

    def inputs_missing(job: Job) -> list[str]:
        """The stages whose output job still waits for (none once its model.pt exists: only evaluation is left)."""
        if not job.stage and trained(job):
            return []
        return [n for n in job.needs if not trained(stage_of[n])]

    for j in todo:
        run_dir = os.path.join(args.workdir, "runs", j.run_name)
        state = (
            "trained: evaluate"
            if trained(j)
            else "resume"
            if os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
            else "new"
        )
        waits = inputs_missing(j)
        print(
            f"  {j.name}: {'stage, ' if j.stage else ''}{state}"
            + (f" (waits for {', '.join(waits)})" if waits else "")
            + (f" ~{minutes[j.name]:.0f} min" if deadline and not trained(j) else "")
            + (" (would not finish by the deadline)" if deadline and not fits(j) else "")
            + ("  " + " ".join(j.train_command(state == "resume")[1:]) if args.dry_run else "")
        )
    if args.dry_run:
        return 0

    n_failed, done, durations, started, failed_stages, not_started = 0, 0, [], time.time(), set(), []
    in_flight = {"n": 0}

    def finished(job: Job, payload: dict | None, error: str | None, seconds: float) -> None:
        nonlocal n_failed, done
        done += 1
        if error is None:
            if not job.stage:
                write_json_atomic(result[job.name], payload)
            else:  # one record per time the stage was built (a new session rebuilds it: do the hashes agree?)
                write_json_atomic(stage_record[job.name], {"stage": job.name, "builds": stage_builds(job) + [payload]})
            if os.path.isfile(os.path.join(failed_dir, f"{job.name}.json")):
                os.remove(os.path.join(failed_dir, f"{job.name}.json"))
            durations.append(seconds)
            minutes.update(expected_minutes(todo, out_dir, args.unknown_minutes))  # with the result just written
            summary = (
                f"stage done: {payload['output']}"
                if job.stage
                else ", ".join(f"{c} {v:.3f}" for c, v in payload.get("normalised_return", {}).get("paper-tables", {}).items())
                + (
                    "win rate clean {win_rate_clean:.3f}, noisy {win_rate_noisy:.3f} at {step} steps".format(
                        **payload["starcraft"]["final"]
                    )
                    if "starcraft" in payload
                    else ""
                )
            )
        else:
            n_failed += 1
            failed_stages.update([job.name] if job.stage else [])
            write_json_atomic(
                os.path.join(failed_dir, f"{job.name}.json"),
                {"run": job.run_name, "command": " ".join(job.train_command(False)), "error": error},
            )
            summary = f"FAILED: {error}"
        eta = (sum(durations) / len(durations)) * (len(todo) - done) / workers / 60 if durations else float("nan")
        print(
            f"[{done}/{len(todo)} done, {in_flight['n']} running, {n_failed} failed, "
            f"{(time.time() - started) / 60:.0f} min, "
            f"ETA {eta:.0f} min] {job.name} ({seconds / 60:.1f} min): {summary}",
            flush=True,
        )

    def schedule(limit: int, submit, wait_one) -> None:
        """Start jobs in grid order as soon as their inputs exist, at most `limit` at a time, until none is left.
        submit(job) -> handle; wait_one(handles) -> (handle, payload, error, seconds) of a finished one."""
        pending, running = list(todo), {}
        while pending or running:
            for job in [j for j in pending if inputs_missing(j) and set(j.needs) & failed_stages]:
                pending.remove(job)
                bad = sorted(set(job.needs) & failed_stages)
                why = f"needs stage {', '.join(bad)}, which failed (see {os.path.join(failed_dir, bad[0])}.json)"
                finished(job, None, why, 0.0)
            while len(running) < limit:  # the first job in grid order whose inputs exist and that fits the deadline
                job = next((j for j in pending if not inputs_missing(j) and fits(j)), None)
                if job is None:
                    break
                pending.remove(job)
                running[submit(job)] = job
                in_flight["n"] = len(running)
            if not running:
                # left: jobs that would not finish by the deadline (and those waiting for a stage that did not
                # start for that reason): not started, not failed; the rest waits for an output nothing will write
                late, grew = {j.name for j in pending if not fits(j) and not inputs_missing(j)}, True
                while grew:  # and what waits for those, stage after stage
                    more = {j.name for j in pending if any(n in late for n in inputs_missing(j))} - late
                    late, grew = late | more, bool(more)
                for job in pending:
                    if job.name not in late:
                        finished(
                            job, None, f"needs the output of stage {', '.join(inputs_missing(job))}, which is missing", 0.0
                        )
                not_started.extend(j.name for j in pending if j.name in late)
                return
            handle, payload, error, seconds = wait_one(list(running))
            job = running.pop(handle)
            in_flight["n"] = len(running)
            finished(job, payload, error, seconds)

    if args.backend == "local":

        def timed(job):
            t0 = time.time()
            try:
                return run_job(job, args.workdir), None, time.time() - t0
            except Exception as e:  # noqa: BLE001 - a failed run is recorded, the others continue
                return None, str(e), time.time() - t0

        def wait_local(futures):
            fut = next(iter(concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)[0]))
            return (fut, *fut.result())

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            schedule(workers, lambda job: pool.submit(timed, job), wait_local)
    else:
        try:
            import ray
        except ImportError:
            envs.fail("--backend ray needs the ray package (pip install -r requirements.txt)")
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers get run_job by value
        remote = ray.remote(num_cpus=1, max_retries=0)(run_job)
        started_at = {}

        def submit_ray(job):
            ref = remote.remote(job, args.workdir)
            started_at[ref] = time.time()
            return ref

        def wait_ray(refs):
            ready, _ = ray.wait(refs, num_returns=1)
            t0 = started_at.pop(ready[0])
            try:
                return ready[0], ray.get(ready[0]), None, time.time() - t0
            except Exception as e:  # noqa: BLE001 - ray wraps the job's exception
                return ready[0], None, str(getattr(e, "cause", e)).splitlines()[-1], time.time() - t0

        limit = workers if not args.address else max(1, int(ray.cluster_resources().get("CPU", 1)))
        schedule(limit, submit_ray, wait_ray)
        ray.shutdown()

    if not_started:
        print(
            f"{len(not_started)} jobs not started: they would not finish by the deadline "
            f"({time.strftime('%H:%M', time.localtime(deadline))}); the next start runs them: {', '.join(not_started)}",
            flush=True,
        )
    building = any(p in BUILDING_PROTOCOLS for j in runs for p in j.protocols)
    have_any = any(os.path.isfile(result[j.name]) for j in runs)
    if args.report and building and have_any:  # the building report (docs/results.md)
        import report

        report.main(report.Args(results=[out_dir], out=os.path.join(os.path.dirname(args.results_dir), "results.md")))
    elif args.report and have_any:  # a StarCraft grid: docs/results_<grid>.md
        import starcraft_report

        starcraft_report.main(starcraft_report.Args(results=out_dir))
    have = sum(os.path.isfile(result[j.name]) for j in runs)
    print(
        f"grid {grid}: {have} of {len(runs)} runs have results"
        + (f"; {n_failed} failed, see {failed_dir}" if n_failed else "")
    )
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
