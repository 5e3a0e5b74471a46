"""The package's layers, read from its imports (top-level and inside functions alike): the core
imports no other part, the engine no measure, the measures nothing from the public face or the
study, the public face nothing from the study, and the study's analysis nothing from its sweeps.
Each rule names the imports that break it."""
import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "sharpfast"

CORE = {"settings", "params", "objective", "precision", "philox", "_ops", "result"}
MEASURES = {"worst_case", "average_case", "geodesic", "curvature"}
TRAINING = {"optim"}   # sharpness-aware training: the core's ops, no measure
PUBLIC = {"api", "many", "compat", "kernel_check", "doctor", "landscapes", "__init__"}
ANALYSIS = {"analysis"}   # in sharpfast.study


@functools.cache
def modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    """The sharpfast modules ``name`` imports, resolved (``from . import x`` counts as ``pkg.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if node.module:   # (``from . import x`` imports x, not the package's own names)
                found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}   # a submodule, where it is one
    known = modules()
    return {m for m in found if m in known and m != name}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "public"   # sharpfast itself (its lazy names)
    head = parts[1]
    if head in CORE:
        return "core"
    if head == "engine":
        return "engine"
    if head in MEASURES:
        return "measure"
    if head in TRAINING:
        return "training"
    if head == "study":
        return "analysis" if len(parts) > 2 and parts[2] in ANALYSIS else "study"
    if head == "__main__":
        return "entry"
    assert head in PUBLIC, f"{module} belongs to no layer: add it to one in this test"
    return "public"


ALLOWED = {   # layer -> the layers it may import
    "core": {"core"},
    "engine": {"core", "engine"},
    "measure": {"core", "engine", "measure"},
    "training": {"core", "training"},
    "public": {"core", "engine", "measure", "training", "public"},
    "analysis": {"core", "engine", "measure", "public", "analysis", "study"},
    "study": {"core", "engine", "measure", "training", "public", "analysis", "study"},
    "entry": {"public", "study", "analysis"},
}


EXECUTION = (["sharpfast", "study", "sweep"], ["sharpfast", "study", "cli"])   # what the analysis never needs


@pytest.mark.parametrize("own", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(own):
    broken = sorted(f"{name} imports {imported}" for name, path in modules().items() if layer(name) == own
                    for imported in imports_of(name, path) if layer(imported) not in ALLOWED[own])
    assert broken == []


def test_the_analysis_reads_stores_without_the_sweeps():
    broken = sorted(f"{name} imports {imported}" for name, path in modules().items() if layer(name) == "analysis"
                    for imported in imports_of(name, path) if imported.split(".")[:3] in EXECUTION)
    assert broken == []


STUDY_ORDER = ["workers", "zoo", "measures", "definitions", "store", "sweep", "analysis", "experiments", "cli"]


def test_the_study_imports_in_pipeline_order():
    """A step of the study imports only the steps before it (the zoo nothing after it, the sweep no
    analysis): the folders read in the order the pipeline runs."""
    place = lambda module: STUDY_ORDER.index(module.split(".")[2])
    study = {n: p for n, p in modules().items() if n.startswith("sharpfast.study.")}
    assert {n.split(".")[2] for n in study} == set(STUDY_ORDER)
    broken = sorted(f"{name} imports {imported}" for name, path in study.items()
                    for imported in imports_of(name, path)
                    if imported.startswith("sharpfast.study.") and place(imported) > place(name))
    assert broken == []


def test_the_rules_see_every_kind_of_import():
    found = imports_of("sharpfast.worst_case.fused", ROOT / "worst_case" / "fused.py")
    assert {"sharpfast._ops", "sharpfast.engine.problems", "sharpfast.engine.flat", "sharpfast.worst_case.apgd",
            "sharpfast.settings"} <= found
    lazy = imports_of("sharpfast.api", ROOT / "api.py")   # imported inside functions
    assert {"sharpfast.worst_case.fused", "sharpfast.average_case.reference", "sharpfast.kernel_check"} <= lazy
