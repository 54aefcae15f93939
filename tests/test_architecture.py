"""The package's shape (docs/architecture.md): no import circles, fastgrpo.config imports nothing from the
package, no source file over 600 lines.

The import graph is read statically (ast), so it includes imports inside functions: a circle that
only a lazy import closes still couples the two modules, and it is one edit away from an import-time
failure. Edges are the modules an import statement names, nothing more. In particular importing
``fastgrpo.rollout.base`` runs ``fastgrpo/rollout/__init__.py`` first, but that implied edge to the
parent package is not counted: a package's own ``__init__`` importing its submodules, and a submodule
importing its sibling, is not a circle. ``from fastgrpo.rollout import make_engine`` inside a rollout
submodule names the package itself, and that edge is counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers.paths import REPO

# (folder, the package name it is installed as): kernels/ is installed as fastgrpo.kernels.
PACKAGE_ROOTS = ((REPO / "fastgrpo", "fastgrpo"), (REPO / "kernels", "fastgrpo.kernels"))
MAX_LINES = 600
LINE_CHECKED_FOLDERS = ("fastgrpo", "kernels", "tests", "benchmarks", "profiling")


def module_files() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} for every module of the package."""
    out = {}
    for folder, package in PACKAGE_ROOTS:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join([package, *parts])] = (path, is_package)
    return out


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules that ``source`` (the text of ``module``) imports, anywhere in the file."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this module's package, each further level one up
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    # `import fastgrpo.kernels.logprob` names that module; keep only the package's own modules
    resolved = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            resolved.add(name)
    return resolved


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(path.read_text(), name, is_package, known) for name, (path, is_package) in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, each as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(root: str) -> None:  # Tarjan, iterative: deep graphs must not hit the recursion limit
        nonlocal counter
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_in(graph, set(component), component[0]) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


# ----------------------------------------------------------------------------------------------
# The checker can fail: synthetic graphs and sources
# ----------------------------------------------------------------------------------------------


def test_find_cycles_names_the_cycle_of_a_synthetic_graph():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a", "p.d"}, "p.d": set(), "p.e": {"p.e"}}
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["p.a", "p.b", "p.c", "p.a"], ["p.e", "p.e"]]
    assert find_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set()}) == []


def test_imports_of_resolves_relative_lazy_and_submodule_imports():
    known = {"fastgrpo", "fastgrpo.rollout", "fastgrpo.rollout.base", "fastgrpo.rollout.vllm", "fastgrpo.kernels",
             "fastgrpo.kernels.logprob", "fastgrpo.kernels.tiles", "fastgrpo.config"}
    source = (
        "import os\n"
        "from .tiles import TILE\n"  # relative, level 1
        "from . import logprob\n"  # a sibling named as an attribute of the package
        "def f():\n"
        "    from fastgrpo.config import Config\n"  # inside a function
        "    import fastgrpo.rollout.vllm\n"
    )
    assert imports_of(source, "fastgrpo.kernels.aot", False, known) == {
        "fastgrpo.kernels.tiles", "fastgrpo.kernels.logprob", "fastgrpo.config", "fastgrpo.rollout.vllm"}
    # in a package __init__, level 1 is the package itself; `..` is its parent
    assert imports_of("from .base import X\nfrom .. import config\n", "fastgrpo.rollout", True, known) == {
        "fastgrpo.rollout.base", "fastgrpo.config"}


def test_a_package_init_importing_its_submodule_is_not_a_circle_but_naming_the_package_back_is():
    known = {"pkg", "pkg.base", "pkg.engine"}
    init = imports_of("from pkg.engine import Engine\n", "pkg", True, known)
    sibling = imports_of("from pkg.base import Base\n", "pkg.engine", False, known)
    assert find_cycles({"pkg": init, "pkg.engine": sibling, "pkg.base": set()}) == []
    back = imports_of("from pkg import helper\n", "pkg.engine", False, known)
    assert find_cycles({"pkg": init, "pkg.engine": back, "pkg.base": set()}) == [["pkg", "pkg.engine", "pkg"]]


# ----------------------------------------------------------------------------------------------
# The repository
# ----------------------------------------------------------------------------------------------


def test_the_graph_covers_both_roots():
    graph = import_graph()
    assert {"fastgrpo.config", "fastgrpo.trainer", "fastgrpo.kernels", "fastgrpo.kernels.logprob"} <= set(graph)
    assert "fastgrpo.kernels.logprob" in graph["fastgrpo.kernels"]  # kernels/__init__ re-exports token_logprobs


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_config_imports_nothing_from_the_package():
    # Every default lives in fastgrpo.config; anything that reads a registry imports config, not the
    # reverse. Its modules (schema, loading, checks) import only each other.
    graph = import_graph()
    config_modules = {name for name in graph if name == "fastgrpo.config" or name.startswith("fastgrpo.config.")}
    assert {"fastgrpo.config.schema", "fastgrpo.config.loading", "fastgrpo.config.checks"} <= config_modules
    outside = {name: graph[name] - config_modules for name in config_modules if graph[name] - config_modules}
    assert not outside, f"fastgrpo.config imports from the rest of the package: {outside}"


def test_kernels_import_nothing_outside_the_kernels():
    # kernels/ is usable alone (and by the roofline's command line) without the trainer's modules.
    graph = import_graph()
    outside = {(m, d) for m, deps in graph.items() if m.startswith("fastgrpo.kernels")
               for d in deps if not d.startswith("fastgrpo.kernels")}
    assert not outside, f"kernels import the rest of the package: {sorted(outside)}"


def _registries() -> dict[str, tuple[str, ...]]:
    """{config key: the names its registry holds}, read from the modules that implement the choice."""
    from fastgrpo import advantages, attention, lora, rollout
    from fastgrpo.data import prompts
    from fastgrpo.kernels import grpo_aggregation, grpo_loss
    from fastgrpo.rewards import shaping

    return {
        "loss.loss_type": tuple(grpo_aggregation.LOSS_AGGREGATIONS),
        "loss.importance_sampling_level": grpo_loss.IMPORTANCE_SAMPLING_LEVELS,
        "loss.sampler_mask": grpo_loss.SAMPLER_MASKS,
        "loss.scale_rewards": tuple(advantages.ADVANTAGE_SCALINGS),
        "rollout.engine": rollout.ENGINE_KINDS,
        "rollout.mode": rollout.ROLLOUT_MODES,
        "model.attention": attention.BACKENDS,
        "data.template": prompts.PROMPT_TEMPLATES,
        "reward_params.compat": shaping.COSINE_COMPAT,
        "lora.sync": lora.SYNC_METHODS,
    }


def test_config_choices_are_the_registries():
    # fastgrpo.config cannot import the registries (see its CHOICES comment); this keeps its copies exact.
    from fastgrpo.config import CHOICES

    differ = {key: (CHOICES.get(key), names) for key, names in _registries().items()
              if set(CHOICES.get(key, ())) != set(names)}
    assert not differ, f"config.CHOICES differs from the registries, as {{key: (CHOICES, registry)}}: {differ}"


def test_the_registry_check_can_fail(monkeypatch):
    from fastgrpo.kernels import grpo_aggregation

    monkeypatch.setitem(grpo_aggregation.LOSS_AGGREGATIONS, "new_loss", lambda batch: batch)
    with pytest.raises(AssertionError, match="loss.loss_type"):
        test_config_choices_are_the_registries()


@pytest.mark.parametrize("folder", LINE_CHECKED_FOLDERS)
def test_no_python_file_over_600_lines(folder):
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / folder).rglob("*.py"))
            if ".venv" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along a seam): {long}"
