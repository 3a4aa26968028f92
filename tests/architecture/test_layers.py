"""The package layout is the architecture: each folder of ca_daemon/ is a floor, and an
import only ever points down (docs/architecture.md). This walks every module's imports,
module-level and function-local, with the standard library's parser."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ca_daemon"

# Ground first. A module may import its own floor and any floor below it.
FLOORS = [
    "util",
    "pki",
    "config",
    "model",
    "anchor",
    "journal",
    "publish",
    "rotation",
    "report",
    "service",
    "api",
    "<front>",  # cli.py, daemon.py, __main__.py: the composition root
]
# A function-local import of a project module needs a reason on its line or the one above.
LOCAL_IMPORT_REASON = "local import:"


def _floor(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "ca_daemon", module
    if len(parts) == 1:
        return -1  # ca_daemon/__init__.py holds only the version: below everything
    if parts[1] == "errors":
        return -1  # the one exception tree: every floor raises from it
    if parts[1] in FLOORS:
        return FLOORS.index(parts[1])
    return FLOORS.index("<front>")


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return found


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of ca_daemon."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == "ca_daemon":
                    for alias in child.names:
                        target = f"{child.module}.{alias.name}"
                        # `from ca_daemon.report import forecast` imports a module
                        is_module = (
                            (PACKAGE.parent / target.replace(".", "/")).with_suffix(".py").exists()
                        )
                        out.append((target if is_module else child.module, child.lineno, nested))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "ca_daemon":
                        out.append((alias.name, child.lineno, nested))
            visit(child, nested)

    visit(tree, False)
    return out


def _explained(lines: list[str], index: int) -> bool:
    """The reason sits on the import's line or above its run of imports."""
    while index >= 0:
        text = lines[index].strip()
        if LOCAL_IMPORT_REASON in text:
            return True
        if not text.startswith(("from ", "import ", ")")) and not text.endswith(","):
            return False
        index -= 1
    return False


MODULES = _modules()


def test_the_walk_sees_the_whole_package() -> None:
    names = {name for name, _ in MODULES}
    assert {"ca_daemon.rotation.engine", "ca_daemon.cli", "ca_daemon.util.files"} <= names
    assert len(names) > 50


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module: str, path: Path) -> None:
    mine = _floor(module)
    upward = [
        f"line {line}: {target} ({FLOORS[_floor(target)]}) is above {FLOORS[mine]}"
        for target, line, _ in _imports(path)
        if _floor(target) > mine
    ]
    assert not upward, f"{module} imports up a floor:\n" + "\n".join(upward)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_project_imports_sit_at_the_top_unless_a_comment_says_why(module: str, path: Path) -> None:
    lines = path.read_text().splitlines()
    unexplained = [
        f"line {line}: {target}"
        for target, line, in_function in _imports(path)
        if in_function and not _explained(lines, line - 1)
    ]
    assert not unexplained, f"{module} imports inside a function without a reason:\n" + "\n".join(
        unexplained
    )


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ca_daemon.api.server import build_app\n")
    (target, _, in_function) = _imports(bad)[0]
    assert target == "ca_daemon.api.server" and in_function
    assert _floor(target) > _floor("ca_daemon.publish.kubernetes")


def _exception_classes() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for module, path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception"))
                for b in node.bases
            ):
                found.append((module, node))
    return found


def test_one_exception_tree() -> None:
    """Every exception class of ours derives, through our own classes, from CaDaemonError;
    only ca_daemon/errors.py names a built-in base."""
    builtin = {"Exception", "ValueError", "BaseException", "RuntimeError", "OSError"}
    roots = [
        f"{module}.{node.name}"
        for module, node in _exception_classes()
        if module != "ca_daemon.errors"
        and any(isinstance(b, ast.Name) and b.id in builtin for b in node.bases)
        and not any(isinstance(b, ast.Name) and b.id not in builtin for b in node.bases)
    ]
    assert roots == [], f"exception classes outside the tree: {roots}"
    from ca_daemon import errors  # local import: only this test needs the tree itself

    tree_roots = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__bases__[0] is Exception
    }
    assert tree_roots == {"CaDaemonError"}
