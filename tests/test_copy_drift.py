"""Copy drift: the code the nine training scripts share is the same code in every script that has it.

The scripts are CleanRL-style single files, so DRQN, QNetworks, Batch, ReplayBuffer, masked_argmax,
linear_schedule, the QMIX mixer, QTRAN's networks and losses, the TV dual (eta_bounds, DualNetwork,
dual_loss, the loop's dual_eta), the robust targets and target values are copied from script to script
(the per-agent layers are fused.py's and the acting window envs.History: one copy each, imported).
A fix made in one copy and not in the others changes one method's numbers silently; these tests make it
fail instead.

How: every script is parsed with ``ast`` (nothing is imported or run). Each top-level function, each
method of each top-level class (and the class's own statements: bases, decorators, class attributes), each
function defined inside the ``if __name__ == "__main__":`` block and each field of ``Args`` is one unit,
named e.g. ``ReplayBuffer.add``, ``__main__.dual_eta``, ``Args.gamma``. A unit's code is its ``ast.dump``
with docstrings removed (docstrings and comments name each script's own Algorithm lines and differ by
design; everything that can change a number is in the AST). For every unit defined in two or more scripts
the scripts are grouped by code; the grouping must equal the one declared in ``DESIGNED`` below (each
entry with the reason the copies differ), and every unit not declared there must be the same in all the
scripts that define it. A declared difference that no longer exists fails too, so the list stays true.

Not compared: ``Args`` as a whole and ``check_args`` (each script's own flags; the shared fields of
``Args`` are compared one by one) and the training loops themselves (the loop tests check those by
their numbers).

GroupDR's ``target_values`` (a Batch and the target networks -> V', 0 where terminated) is the very copy of
the robust script of the same factorisation (its target ignores V' there anyway: checked below).
"""

from __future__ import annotations

import ast
import os

import pytest
import torch
from conftest import ROOT, import_file

VDN = ("robust_vdn_rho", "robust_vdn_tv", "groupdr_vdn")
QMIX = ("robust_qmix_rho", "robust_qmix_tv", "groupdr_qmix")
QTRAN = ("robust_qtran_rho", "robust_qtran_tv", "groupdr_qtran")
SCRIPTS = VDN + QMIX + QTRAN
ESTIMATOR = "groupdr_estimator"  # GroupDR stage 1: scanned too, in case it grows a copy of a shared unit
GROUPDR_MODULES = ("groupdr_reward", "groupdr_offline")  # GroupDR's shared estimator and offline fit: scanned too
RHO = ("robust_vdn_rho", "robust_qmix_rho", "robust_qtran_rho")
TV = ("robust_vdn_tv", "robust_qmix_tv", "robust_qtran_tv")
NOT_QTRAN = tuple(s for s in SCRIPTS if s not in QTRAN)
PER_SCRIPT = {"Args", "check_args"}  # each script's own flags and checks

# unit -> (the groups of scripts whose copies are equal, why the groups differ). Scripts that do not
# define the unit are left out of the groups.
DESIGNED = {
    "QNetworks.forward": (
        (NOT_QTRAN, QTRAN),
        (
            "QTRAN's agents also return their last LSTM outputs (with_features): "
            "Q_jt and V take the summed agent features (paper F.2, released networks)"
        ),
    ),
    "QNetworks.greedy_q": ((NOT_QTRAN, QTRAN), "QTRAN's passes with_features through"),
    "ReplayBuffer.__init__": (
        (NOT_QTRAN, QTRAN),
        ("QTRAN's buffer also stores avail at h: L_opt's greedy a_bar at h is masked to available actions"),
    ),
    "ReplayBuffer.add": ((NOT_QTRAN, QTRAN), "QTRAN's add takes and stores avail at h"),
    "Batch.__init__": (
        (
            tuple(s for s in RHO + TV if s not in QTRAN),
            tuple(s for s in RHO + TV if s in QTRAN),
            ("groupdr_vdn", "groupdr_qmix"),
            ("groupdr_qtran",),
        ),
        (
            "QTRAN's minibatch also carries avail at h (L_opt's masked greedy a_bar); GroupDR's carries t, "
            "the step in the episode the reward estimator r-tilde(s, a, t) reads"
        ),
    ),
    "robust_target": ((RHO, TV), "rho-contamination target (Eq. 15 / 27-28) vs the TV dual target (Eq. 16 / 29)"),
    "target_values": (
        (VDN, QMIX, QTRAN),
        (
            "V' of each factorisation: sum of the agents' masked maxima (VDN), the target mixer on s' "
            "(QMIX), the target Q_jt at the masked greedy joint action (QTRAN)"
        ),
    ),
    "Args.max_grad_norm": (
        (
            (*VDN,),
            ("robust_qmix_rho", "robust_qmix_tv", "robust_qtran_rho", "groupdr_qmix", "groupdr_qtran"),
            ("robust_qtran_tv",),
        ),
        (
            "the released configuration per variant (shared/notes/paper-facts.md): no clip for VDN, "
            "10 for QMIX / QTRAN / the GroupDR QMIX and QTRAN, 1.0 for QTRAN-TV"
        ),
    ),
    "Args.dual_max_grad_norm": (
        (("robust_vdn_tv", "robust_qmix_tv"), ("robust_qtran_tv",)),
        "released: the dual network is clipped at 1.0 in QTRAN-TV only",
    ),
    "Args.rho": (
        (RHO, ("robust_qmix_tv", "robust_qtran_tv"), ("robust_vdn_tv",)),
        "default rho: 0 (non-robust) for contamination, the published TV rho (QMIX / QTRAN 0.2, VDN 0.5)",
    ),
    "Args.hidden_dim": (((ESTIMATOR,), SCRIPTS), "the reward estimator's MLP width (128) is not the agents' hidden 64"),
}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _code(node: ast.AST) -> str:
    """The node's code without docstrings (a copy: the parsed tree is left as it is)."""
    return ast.dump(_strip_docstrings(ast.parse(ast.unparse(node))), include_attributes=False)


def _main_block(tree: ast.Module) -> ast.If | None:
    mains = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    return mains[0] if mains else None


def units(script: str) -> dict[str, ast.AST]:
    """name -> AST node of every unit of algos/<script>.py (see the module docstring)."""
    with open(os.path.join(ROOT, "algos", f"{script}.py")) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            rest = []
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{item.name}"] = item
                elif node.name == "Args" and isinstance(item, ast.AnnAssign):
                    out[f"Args.{item.target.id}"] = item
                else:
                    rest.append(item)
            shell = ast.ClassDef(
                name=node.name,
                bases=node.bases,
                keywords=node.keywords,
                body=rest or [ast.Pass()],
                decorator_list=node.decorator_list,
            )
            out[node.name] = shell
    main = _main_block(tree)
    for node in ast.walk(main) if main is not None else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[f"__main__.{node.name}"] = node
    return out


@pytest.fixture(scope="module")
def all_units() -> dict[str, dict[str, ast.AST]]:
    return {s: units(s) for s in (*SCRIPTS, ESTIMATOR, *GROUPDR_MODULES)}


def partition(all_units, unit: str) -> set[frozenset[str]]:
    """The scripts that define ``unit``, grouped by equal code."""
    groups: dict[str, set[str]] = {}
    for script, defined in all_units.items():
        if unit in defined:
            groups.setdefault(_code(defined[unit]), set()).add(script)
    return {frozenset(g) for g in groups.values()}


def shared_units(all_units) -> list[str]:
    names = {}
    for defined in all_units.values():
        for name in defined:
            if name.split(".")[0] not in PER_SCRIPT or name.startswith("Args."):
                names[name] = names.get(name, 0) + 1
    return sorted(n for n, count in names.items() if count >= 2)


def test_every_script_has_the_shared_core(all_units):
    """The units every training loop relies on exist in all nine scripts (a rename would otherwise drop a copy
    out of the comparison below without a failure)."""
    core = [
        "DRQN.__init__",
        "DRQN.forward",
        "QNetworks.__init__",
        "QNetworks.forward",
        "QNetworks.greedy_q",
        "Batch",
        "Batch.__init__",
        "Batch.windows",
        "ReplayBuffer.__init__",
        "ReplayBuffer.add",
        "ReplayBuffer.target_changed",
        "ReplayBuffer.sample",
        "ReplayBuffer.sample_slots",
        "ReplayBuffer.stale",
        "ReplayBuffer.windows",
        "masked_argmax",
        "linear_schedule",
        "target_values",
    ]
    for script in SCRIPTS:
        missing = [u for u in core if u not in all_units[script]]
        assert not missing, (script, missing)
    for script in QMIX:
        assert "QMixer.forward" in all_units[script], script
    for script in QTRAN:
        assert "QTranNetworks.q_jt" in all_units[script] and "qtran_losses" in all_units[script], script
    for script in TV:
        assert {"eta_bounds", "dual_loss", "DualNetwork.forward", "__main__.dual_eta"} <= set(all_units[script]), script
    for script in SCRIPTS[2::3]:  # the GroupDR scripts
        assert "groupdr_target" in all_units[script], script
    for script in RHO + TV:
        assert "robust_target" in all_units[script], script


def test_shared_units_are_identical_except_the_designed_differences(all_units):
    """Every unit in two or more scripts: one code for all of them, or exactly the declared groups."""
    drift = []
    for unit in shared_units(all_units):
        got = partition(all_units, unit)
        if unit in DESIGNED:
            want = {frozenset(s for s in g if unit in all_units[s]) for g in DESIGNED[unit][0]} - {frozenset()}
        else:
            want = {frozenset(s for s in all_units if unit in all_units[s])}
        if got != want:
            drift.append(
                f"{unit}: copies grouped as {sorted(sorted(g) for g in got)}, expected "
                f"{sorted(sorted(g) for g in want)}" + (f" ({DESIGNED[unit][1]})" if unit in DESIGNED else "")
            )
    assert not drift, "copy drift:\n" + "\n".join(drift)


def test_designed_differences_name_units_that_exist(all_units):
    """Each declared exception is about a unit that is still shared (a rename must update the list)."""
    shared = set(shared_units(all_units))
    assert set(DESIGNED) <= shared, sorted(set(DESIGNED) - shared)


@pytest.mark.parametrize(
    "groupdr,robust",
    [("groupdr_vdn", "robust_vdn_rho"), ("groupdr_qmix", "robust_qmix_rho"), ("groupdr_qtran", "robust_qtran_rho")],
)
def test_groupdr_target_values_is_the_robust_copy(all_units, groupdr, robust):
    """GroupDR's target_values is the robust script's of its factorisation, statement for statement (with the
    same no_grad decorator): V' of the Batch, 0 for terminated transitions; GroupDR's target ignores V' there
    anyway (checked here), so the zero is for the robust scripts' batch-min m and dual, which read it."""
    ours, theirs = all_units[groupdr]["target_values"], all_units[robust]["target_values"]
    assert _code(ours) == _code(theirs)
    assert "torch.no_grad" in ast.unparse(ours.decorator_list[0]) and "b.terminated" in ast.unparse(ours.body[-1])
    mod = import_file(f"{groupdr}_under_test", f"algos/{groupdr}.py")
    r, v = torch.tensor([-2.0, -3.0]), torch.tensor([-50.0, 1e6])
    torch.testing.assert_close(mod.groupdr_target(r, v, torch.tensor([0.0, 1.0]), 0.9), torch.tensor([-2.0 - 45.0, -3.0]))


@pytest.mark.parametrize(
    "groupdr,robust",
    [("groupdr_vdn", "robust_vdn_rho"), ("groupdr_qmix", "robust_qmix_rho"), ("groupdr_qtran", "robust_qtran_rho")],
)
def test_groupdr_target_is_the_nominal_robust_target(groupdr, robust):
    """GroupDR's target differs from the robust scripts' by design only in its reward (r-tilde from the
    estimator, fed by the loop): as a function it is Eq. (15) at rho = 0, the robust script's target with
    no uncertainty, on every input (terminated or not)."""
    g = import_file(f"{groupdr}_under_test", f"algos/{groupdr}.py")
    r = import_file(f"{robust}_under_test", f"algos/{robust}.py")
    gen = torch.Generator().manual_seed(0)
    reward = torch.randn(64, generator=gen, dtype=torch.float64)
    value = torch.randn(64, generator=gen, dtype=torch.float64) * 50
    terminated = (torch.rand(64, generator=gen) < 0.3).double()
    torch.testing.assert_close(
        g.groupdr_target(reward, value, terminated, 0.997),
        r.robust_target(reward, value, terminated, 0.997, 0.0),
        rtol=0,
        atol=0,
    )
