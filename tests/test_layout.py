"""The shape of the library: imports in `cllm/` flow one way, `cllm` stays Ray-free and light to
import, and no module grows past a size a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CLLM = Path(__file__).resolve().parents[1] / "cllm"
MAX_MODULE_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(CLLM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the `cllm` modules it imports anywhere in its body (function-level imports too)."""
    modules = {module_name(path): path for path in CLLM.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from cllm.toy import code` imports the module cllm.toy.code, not just cllm.toy
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name].update(target for target in targets if target in modules and target != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_cllm():
    graph = import_graph()
    assert "cllm.hf" in graph["cllm.jacobi"] or "cllm.cache" in graph["cllm.jacobi"]  # the graph is real
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_toy_teacher_never_imports_the_model_loader():
    graph = import_graph()
    assert "cllm.hf" not in graph["cllm.toy.teacher"]
    leaves = ("cllm.metrics", "cllm.schedule", "cllm.progress", "cllm.device", "cllm.toy.math", "cllm.toy.code",
              "cllm.toy.sql", "cllm.toy.sql_schema")
    for leaf in leaves:  # a toy task may be split over leaves (sql's schemas are their own)
        assert graph[leaf] <= {"cllm.toy", *leaves}, f"{leaf} imports {graph[leaf]}"


def test_importing_the_decoder_loads_no_teacher_builder_plotting_or_ray():
    code = (
        "import sys, cllm.jacobi, cllm.collate, cllm.losses, cllm.trajectory, cllm.evaluation;"
        "heavy = [m for m in ('cllm.toy.teacher', 'matplotlib', 'ray', 'deepspeed') if m in sys.modules];"
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_server_never_imports_the_recipes():
    """serve/ and pipelines/ share their Ray helpers through cllm_raytools, not one another."""
    code = "import sys, cllm_serve.app; print(sorted(m for m in sys.modules if m.startswith('cllm_pipelines')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_module_in_cllm_is_too_long():
    lengths = {module_name(path): len(path.read_text().splitlines()) for path in CLLM.rglob("*.py")}
    assert max(lengths.values()) <= MAX_MODULE_LINES, sorted(lengths.items(), key=lambda item: -item[1])[:3]


def test_the_console_scripts_are_the_pipelines():
    from importlib.metadata import entry_points

    scripts = {entry.name: entry for entry in entry_points(group="console_scripts") if entry.name.startswith("cllm-")}
    assert sorted(scripts) == ["cllm-collect", "cllm-demo", "cllm-evaluate", "cllm-train"]
    for name, entry in scripts.items():
        module = entry.load().__module__
        assert module == f"cllm_pipelines.{name.removeprefix('cllm-')}" and entry.value.endswith(":main")
    executable = Path(sys.executable).with_name("cllm-train")
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, check=True)
    assert "--gradient-checkpointing" in result.stdout and "--wait-for-resources" in result.stdout
