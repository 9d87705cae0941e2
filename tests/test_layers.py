"""Layers point down only: every import inside kdbench, top-level or in a function, goes to its own
layer or a lower one, no two modules import each other (directly or round a circle), and the modules
the sweep driver plans with load without torch.

:data:`LAYERS` is the one statement of the order (README, "Layout", describes it).  A new module
under ``kdbench/`` must be placed in it: the test fails for a module no layer claims.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "kdbench"

# Lowest first.  A module may import its own layer and any lower one.  A name claims the module of that
# name and the modules under it; the longest name wins, so ``kdbench.sweep.__main__`` is an entry point,
# not a sweep module; ``kdbench`` itself (the package's ``__init__``, ``__version__``) claims only itself.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # shared helpers: one-line errors, digests, atomic writes and locks, the machine, NaN/inf checks, typed records
    # and how a command is spelled as the user typed it (kdbench.advice)
    (
        "helpers",
        ("kdbench", "kdbench.errors", "kdbench.advice", "kdbench.digest", "kdbench.durable", "kdbench.machine", "kdbench.finite"),
    ),
    ("records", ("kdbench.records",)),
    ("data", ("kdbench.data",)),  # with DataConfig and its checks (kdbench.data.config)
    ("models", ("kdbench.models", "kdbench.packing", "kdbench.stages")),  # stages: the stage table, torch-free
    ("losses", ("kdbench.losses",)),  # with LossConfig and its checks
    ("methods", ("kdbench.methods",)),
    # a trial: its recipe and key (kdbench.config: the key holds the engine's, the losses' and the method's
    # versions), the training loop, teacher cache, single and packed trials
    ("engine", ("kdbench.config", "kdbench.engine")),
    ("profile", ("kdbench.profile",)),  # a sweep's workers count each trained model's complexity
    ("sweep", ("kdbench.sweep",)),
    ("report", ("kdbench.report", "kdbench.bench_summary")),
    # command lines that drive several layers (a sweep ends with its report); nothing imports them
    ("entry points", ("kdbench.cli", "kdbench.train", "kdbench.sweep.__main__", "kdbench.report.__main__")),
)

# Modules the sweep driver, ``--help`` and ``--dry-run`` load: no heavy library at their top level, nor in
# any kdbench module they load at theirs (tests/test_sweep.py runs the driver itself and checks the same)
TORCH_FREE = (
    "kdbench",
    "kdbench.errors",
    "kdbench.advice",
    "kdbench.digest",
    "kdbench.durable",
    "kdbench.machine",
    "kdbench.records",
    "kdbench.data.config",
    "kdbench.data.index",
    "kdbench.data.locate",
    "kdbench.data.presets",
    "kdbench.data.select",
    "kdbench.data.specs",
    "kdbench.stages",
    "kdbench.losses",
    "kdbench.methods",
    "kdbench.config",
    "kdbench.engine",
    "kdbench.engine.pack_rules",
    "kdbench.engine.int8",  # the sweep driver asks whether ONNX Runtime is there, and checks [deploy]
    "kdbench.profile",
    "kdbench.sweep.ablation",
    "kdbench.sweep.cost",
    "kdbench.sweep.executors",
    "kdbench.sweep.packs",
    "kdbench.sweep.plan",
    "kdbench.sweep.store",
    "kdbench.sweep.worker",
    "kdbench.sweep.__main__",
    "kdbench.train",
    "kdbench.cli",
)
HEAVY = ("torch", "torchvision", "fvcore", "numpy", "PIL", "pandas", "scipy", "matplotlib", "seaborn")


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a kdbench module, or a third-party top-level name
    line: int
    eager: bool  # runs when the importer is loaded (not in a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} (line {self.line})"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _walk(node: ast.AST, eager: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under ``node``, with whether it runs at import time."""
    for child in ast.iter_child_nodes(node):
        yield child, eager
        lazy = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
            isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
        )
        yield from _walk(child, eager and not lazy)


def imports_of(name: str) -> list[Import]:
    """Every import statement of module ``name``, resolved to modules: ``from a import b`` is module ``a.b``
    when there is one, else ``a``; relative imports are resolved against the module's package."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node, eager in _walk(ast.parse(path.read_text(), str(path)), eager=True):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.split(".")[0] != "kdbench":
                target = target.split(".")[0]  # third-party: its top-level package
            found.append(Import(name, target, node.lineno, eager))
    return found


IMPORTS = {name: imports_of(name) for name in MODULES}


def layer_of(module: str) -> int | None:
    """The rank in :data:`LAYERS` of ``module`` (its longest claiming name), None where no layer claims it."""
    claims = [
        (len(n), rank)
        for rank, (_, names) in enumerate(LAYERS)
        for n in names
        if module == n or (n != "kdbench" and module.startswith(n + "."))
    ]
    return max(claims)[1] if claims else None


def internal(module: str) -> list[Import]:
    return [i for i in IMPORTS[module] if i.imported in MODULES and i.imported != module]


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == [], "place these modules in LAYERS (tests/test_layers.py)"
    claimed = [n for _, names in LAYERS for n in names]
    assert [n for n in claimed if n not in MODULES and not any(m.startswith(n + ".") for m in MODULES)] == []
    assert len(claimed) == len(set(claimed))


def test_imports_point_down_only():
    upward = [
        f"{i}: layer {LAYERS[layer_of(i.importer)][0]} imports layer {LAYERS[layer_of(i.imported)][0]}"
        for m in MODULES
        for i in internal(m)
        if layer_of(i.imported) > layer_of(i.importer)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_no_import_cycles():
    graph = {m: {i.imported for i in internal(m)} for m in MODULES}
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    edges = [str(i) for c in cycles for m in c for i in internal(m) if i.imported in c]
    assert not cycles, f"import cycles among {cycles}:\n" + "\n".join(edges)


def test_strongly_connected_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def test_driver_modules_load_without_torch():
    heavy = []
    for start in TORCH_FREE:
        assert start in MODULES, start
        chain = {start: [start]}  # each module loaded at import time, and how it was reached
        todo = [start, *_parents(start)]
        for p in _parents(start):
            chain[p] = [p]
        while todo:
            module = todo.pop()
            for i in IMPORTS[module]:
                if not i.eager:
                    continue
                if i.imported in HEAVY:
                    heavy.append(f"{' -> '.join(chain[module])} -> {i.imported} (line {i.line})")
                for m in [*_parents(i.imported), i.imported]:
                    if m in MODULES and m not in chain:
                        chain[m] = [*chain[module], m]
                        todo.append(m)
    assert not heavy, "heavy imports at the top level of driver modules:\n" + "\n".join(sorted(set(heavy)))


def test_the_imports_are_found():
    """The walk sees function-local and TYPE_CHECKING imports, resolves ``from a import module`` to the
    module, and tells the imports that run at load time from the others."""
    worker = {(i.imported, i.eager) for i in IMPORTS["kdbench.sweep.worker"]}
    assert {("kdbench.engine.trial", False), ("kdbench.sweep.plan", True)} <= worker
    losses = {(i.imported, i.eager) for i in IMPORTS["kdbench.losses"]}
    assert ("torch", False) in losses and ("torch", True) not in losses  # under TYPE_CHECKING, and in functions
    assert "kdbench.losses" in {i.imported for i in IMPORTS["kdbench.methods"]}  # from kdbench import losses
