"""The package's import graph: no cycles, and the layering of DESIGN.md.

Every import statement counts (module level, inside functions, under TYPE_CHECKING): a lazy import is still a
dependency. Layers: the ground floor (the config package, samples, devices, seeding, ..., and `envs.user_files`, the
user-file reading layer, which lives under envs/ so that environments can use it) imports nothing above it;
envs import nothing of the framework; teachers and rollout import only the ground floor (and their own package;
rollout also envs); the learner imports only the ground floor and itself; the pure loss modules import no Ray / vLLM /
transformers; the zoo never imports the learner, rollout, teachers or the run package; only `run/` and the entry
points see everything.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opd_agents", "envs", "teachers")
# The ground floor: these modules and packages (the config package's modules included).
GROUND = {"opd_agents.config", "opd_agents.safe_yaml", "opd_agents.samples", "opd_agents.sampling",
          "opd_agents.devices", "opd_agents.malloc", "opd_agents.seeding", "opd_agents.chat_templates",
          "opd_agents.model_files", "opd_agents.quiet_loading", "envs.user_files"}
PURE_LOSS_MODULES = {f"opd_agents.learner.{m}"
                     for m in ("losses", "diagnostics", "reductions", "supports", "support_logits", "masks")}
HEAVY = {"ray", "vllm", "transformers"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(first-party modules `name` imports, top-level third-party names it imports)."""
    first, third = set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target in known and target != name:
                    first.add(target)
            elif target:
                third.add(target.split(".")[0])
    return first, third


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = modules()
    edges, third = {}, {}
    for name, path in mods.items():
        edges[name], third[name] = imports_of(path, name, set(mods))
    return edges, third


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_ground(name: str) -> bool:
    return any(in_package(name, g) for g in GROUND)


def allowed(src: str, dst: str) -> bool:
    if is_ground(src):
        return is_ground(dst)
    if in_package(src, "envs"):
        return in_package(dst, "envs")
    if in_package(src, "teachers"):
        return in_package(dst, "teachers") or is_ground(dst)
    if in_package(src, "opd_agents.rollout"):
        return in_package(dst, "opd_agents.rollout") or in_package(dst, "envs") or is_ground(dst)
    if in_package(src, "opd_agents.learner"):
        return in_package(dst, "opd_agents.learner") or is_ground(dst)
    if in_package(src, "opd_agents.zoo"):
        return in_package(dst, "opd_agents.zoo") or in_package(dst, "envs") or is_ground(dst)
    return True  # run/ and the entry points see everything


def test_the_graph_covers_the_packages():
    edges, _ = graph()
    assert {"opd_agents.run.trainer", "opd_agents.learner.registry", "teachers.hf", "envs.math.env"} <= set(edges)
    assert "opd_agents.learner.learner" in edges["opd_agents.run.trainer"] or any(
        "opd_agents.learner" in d for d in edges["opd_agents.run.trainer"])


def test_no_import_cycles():
    assert cycles(graph()[0]) == []


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layering_has_no_forbidden_arrow():
    edges, _ = graph()
    forbidden = sorted(f"{src} -> {dst}" for src, dsts in edges.items() for dst in dsts if not allowed(src, dst))
    assert forbidden == []


def test_pure_loss_modules_import_no_engine():
    _, third = graph()
    heavy = {m: sorted(third[m] & HEAVY) for m in PURE_LOSS_MODULES if third[m] & HEAVY}
    assert heavy == {}
