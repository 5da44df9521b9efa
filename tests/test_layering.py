"""The layers of DESIGN.md, read from the code: every import of `glmv/**` runs the right way.

cli → server → tasks → engine → models → kernels, with processing a leaf used by engine and
tasks. `glmv.ray` (the optional Ray application) is a top layer beside cli: only cli imports it
(`glmv serve --ray`, `glmv extract --ray`), it imports no cli, and it reaches the engine, like the
server, only through tasks (of models, only `glmv.models.defaults`). Imports are read with `ast`
(those inside functions count too: they run when called; those under `if TYPE_CHECKING:` count as
well, except where a rule says otherwise). A failure lists each offending import with its file
and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "glmv"

# Engine modules that must stay pure Python (fast to test, usable without a GPU stack).
TORCH_FREE_ENGINE = ("scheduler", "block_manager", "sampling", "sequence", "config", "encoder_cache", "info")
# What of the engine the application layer may use: its client and the request/response types.
ENGINE_FOR_TASKS = ("glmv.engine.client", "glmv.engine.config", "glmv.engine.request", "glmv.engine.sampling",
                    "glmv.engine.structured")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module, e.g. glmv.server.chat
    target: str  # what it imports, e.g. glmv.tasks.service or torch
    line: int

    def __str__(self) -> str:
        return f"{self.module.replace('.', '/')}.py:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


@cache
def imports_of(module: str) -> tuple[tuple[Import, ...], frozenset[int]]:
    """All imports of `module` and the lines that sit under `if TYPE_CHECKING:`."""
    path = modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    known = modules()
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(module, sub if sub in known else base, node.lineno))
    return tuple(out), frozenset(_type_checking_lines(tree))


def all_imports(*, type_checking: bool = True) -> Iterator[Import]:
    for module in modules():
        found, guarded = imports_of(module)
        for imp in found:
            if type_checking or imp.line not in guarded:
                yield imp


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(source: str | tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    sources = (source,) if isinstance(source, str) else source
    return [
        str(imp)
        for imp in all_imports()
        if under(imp.module, *sources) and under(imp.target, *forbidden)
    ]


# --- the arrows --------------------------------------------------------------------------------------


def test_kernels_import_no_models_or_anything_above() -> None:
    assert violations("glmv.kernels", ("glmv.models", "glmv.engine", "glmv.tasks", "glmv.server", "glmv.cli")) == []


def test_models_import_no_engine_or_anything_above() -> None:
    assert violations("glmv.models", ("glmv.engine", "glmv.tasks", "glmv.server", "glmv.cli")) == []


def test_engine_imports_no_application_layer() -> None:
    assert violations("glmv.engine", ("glmv.tasks", "glmv.server", "glmv.cli")) == []


def test_processing_is_a_leaf() -> None:
    forbidden = ("glmv.engine", "glmv.tasks", "glmv.server", "glmv.models", "glmv.kernels", "glmv.cli")
    assert violations("glmv.processing", forbidden) == []


def test_tasks_use_only_the_engine_client_and_types() -> None:
    assert violations("glmv.tasks", ("glmv.server", "glmv.cli", "glmv.models", "glmv.kernels")) == []
    wrong = [
        str(imp)
        for imp in all_imports()
        if under(imp.module, "glmv.tasks") and under(imp.target, "glmv.engine") and not under(imp.target, *ENGINE_FOR_TASKS)
        and imp.target != "glmv.engine"
    ]  # fmt: skip
    assert wrong == []


def test_server_reaches_the_engine_only_through_tasks() -> None:
    # No model code, no engine module (types come through glmv.tasks), so no engine is built here.
    assert violations("glmv.server", ("glmv.models", "glmv.kernels", "glmv.engine", "glmv.cli")) == []


def test_nothing_imports_the_cli() -> None:
    # Not even glmv.ray, the other top layer: the CLI uses it (`--ray`), never the other way.
    wrong = [
        str(imp)
        for imp in all_imports()
        if under(imp.target, "glmv.cli") and not under(imp.module, "glmv.cli") and imp.module != "glmv.__main__"
    ]
    assert wrong == []


def test_only_the_cli_imports_ray() -> None:
    wrong = [
        str(imp)
        for imp in all_imports()
        if under(imp.target, "glmv.ray", "ray") and not under(imp.module, "glmv.cli", "glmv.ray")
    ]
    assert wrong == []


def test_ray_reaches_the_engine_only_through_tasks() -> None:
    # Of the model layer only where the default checkpoint lives (a replica or an actor with no
    # --model makes it in its own node's cache).
    wrong = [
        str(imp)
        for imp in all_imports()
        if under(imp.module, "glmv.ray")
        and under(imp.target, "glmv.models", "glmv.kernels", "glmv.engine")
        and imp.target != "glmv.models.defaults"
    ]
    assert wrong == []


def test_errors_and_the_load_generator_stand_alone() -> None:
    assert [str(i) for i in all_imports() if i.module == "glmv.errors" and under(i.target, "glmv")] == []
    allowed = ("glmv.errors", "glmv.bench_serve")
    wrong = [
        str(i)
        for i in all_imports()
        if i.module == "glmv.bench_serve" and under(i.target, "glmv") and not under(i.target, *allowed)
    ]
    assert wrong == []


# --- torch-free engine modules ----------------------------------------------------------------------


def _closure(module: str) -> dict[str, Import]:
    """Every module `module` reaches through glmv imports (not those under TYPE_CHECKING), with
    the import that first reached it."""
    seen: dict[str, Import] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        found, guarded = imports_of(current)
        for imp in found:
            if imp.line in guarded or imp.target in seen:
                continue
            seen[imp.target] = imp
            if imp.target in modules():
                todo.append(imp.target)
    return seen


def test_scheduling_modules_import_no_torch() -> None:
    wrong = []
    for name in TORCH_FREE_ENGINE:
        module = f"glmv.engine.{name}"
        if module not in modules():
            continue
        for target, imp in _closure(module).items():
            if under(target, "torch", "triton"):
                wrong.append(f"{module} reaches {target} ({imp})")
    assert wrong == []


# --- the test itself reads imports correctly ------------------------------------------------------------


def test_the_reader_sees_relative_lazy_and_guarded_imports(tmp_path: Path) -> None:
    found = {(i.module, i.target) for i in all_imports()}
    assert ("glmv.server.app", "glmv.tasks.service") in found  # module level
    assert ("glmv.cli.serve", "glmv.server.app") in found  # inside a function
    assert ("glmv.server.metrics", "glmv.tasks.types") in found  # under TYPE_CHECKING
    guarded = {(i.module, i.target) for i in all_imports(type_checking=False)}
    assert ("glmv.server.metrics", "glmv.tasks.types") not in guarded


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles_between_modules() -> None:
    """No import closes a circle anywhere in glmv: not module-level ones, and not lazy or
    type-only ones either (the engine client once started cores whose module imported the
    client back for its `EngineInfo`)."""
    graph = {
        module: {
            i.target
            for i in imports_of(module)[0]
            if i.target in modules() and i.target != module and not i.target.startswith(module + ".")
        }  # a package importing its own parts is no circle
        for module in modules()
    }
    assert _cycles(graph) == []


def test_the_server_modules_know_each_other_one_way() -> None:
    """Not even a lazy or a type-only import closes a circle between the server's modules (the
    routes once imported the app, which imported them)."""
    graph = {
        module: {i.target for i in imports_of(module)[0] if under(i.target, "glmv.server") and i.target != module}
        for module in modules()
        if under(module, "glmv.server") and module != "glmv.server"
    }
    assert _cycles(graph) == []
