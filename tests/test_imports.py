"""The module graph: no import cycles among exgrpo_fast / csrc_triton modules (lazy imports inside functions count),
and train.py imports the project's modules at the top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("exgrpo_fast", "csrc_triton")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(path: Path, known: dict[str, Path], *, top_level_only: bool = False) -> set[str]:
    """Project modules imported by the file (`from pkg import mod` resolves to pkg.mod when mod is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known and m not in PACKAGES and not known[m].name == "__init__.py"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    known = modules()
    graph = {m: imported(p, known) for m, p in known.items()}
    assert graph["exgrpo_fast.data.probes"] and graph["exgrpo_fast.train"], "the walker found no imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_layering():
    """The task and the teacher-probe writer share data.problem and never import each other."""
    known = modules()
    tasks = imported(known["exgrpo_fast.data.tasks"], known)
    probes = imported(known["exgrpo_fast.data.probes"], known)
    assert "exgrpo_fast.data.problem" in tasks and "exgrpo_fast.data.problem" in probes
    assert "exgrpo_fast.data.probes" not in tasks and "exgrpo_fast.data.tasks" not in probes


def test_train_imports_project_modules_at_the_top():
    known = modules()
    path = known["exgrpo_fast.train"]
    lazy = imported(path, known) - imported(path, known, top_level_only=True)
    assert not lazy, f"train.py imports {sorted(lazy)} inside functions (only optional dependencies may be lazy)"
