"""The test tree is laid out as the code is, and tests share code only through
tests/support/ (docs/testing.md). This walks every Python file under tests/, imports
module-level and function-local, with the standard library's parser."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
PACKAGE = TESTS.parent / "ca_daemon"

# Test folders that are not a package of ca_daemon/: the front door (cli.py, daemon.py,
# __main__.py), what is shipped beside the code (chart, image, policies, scripts), whole
# scenarios across every layer, and checks of the layout itself.
NOT_PACKAGES = {"cli", "deploy", "system", "architecture"}
# Folders that hold no test module.
NO_TESTS = {"support", "data", "linkerd-check"}
# An import written in a string, e.g. a script run with `python -c`.
IMPORT_IN_TEXT = re.compile(r"^\s*(?:from|import)\s+(tests(?:\.\w+)*)", re.MULTILINE)


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "linkerd-check" not in p.parts)


def _test_modules() -> list[Path]:
    return [p for p in _python_files() if p.name.startswith("test_")]


def _rel(path: Path) -> str:
    return path.relative_to(TESTS.parent).as_posix()


def _imports_of_tests(path: Path) -> list[tuple[str, int]]:
    """(module, line) for each import of a ``tests`` module, in code or in a string."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "tests":
                # `from tests.support import pki` names a module too
                found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "tests"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(m, node.lineno) for m in IMPORT_IN_TEXT.findall(node.value)]
    return found


def _shared(module: str) -> bool:
    return module.split(".")[:2] == ["tests", "support"]


def test_tests_import_only_from_tests_support() -> None:
    """No test module imports another test module (or a conftest): what two tests share
    lives in tests/support/, and support modules import only each other."""
    offences = [
        f"{_rel(path)}:{line} imports {module}"
        for path in _python_files()
        for module, line in _imports_of_tests(path)
        if not _shared(module)
    ]
    assert not offences, "import it from tests.support instead:\n" + "\n".join(offences)


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Guard the guard: a module-level, a function-local and a scripted import are found."""
    module = tmp_path / "test_example.py"
    example = (
        "from TESTS.support.pki import make_ca\n"
        "from TESTS.publish import test_kong_admin\n"
        "def test_x():\n"
        "    import TESTS.rotation.test_plan\n"
        "    script = 'import sys\\nfrom TESTS.system.test_hardening import X\\n'\n"
    )
    module.write_text(example.replace("TESTS", "tests"))  # not an import of this module
    found = [m for m, _ in _imports_of_tests(module) if not _shared(m)]
    assert found == [
        "tests.publish.test_kong_admin",
        "tests.rotation.test_plan",
        "tests.system.test_hardening",
    ]


def test_test_modules_sit_in_a_folder_named_for_what_they_test() -> None:
    """tests/<package>/test_<name>.py, where <package> is a package of ca_daemon/ (or a
    folder of NOT_PACKAGES); none directly in tests/, in unit/ or integration/, or among
    the support files."""
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    misplaced = []
    for path in _test_modules():
        parts = path.relative_to(TESTS).parts
        if len(parts) == 1:
            misplaced.append(f"{_rel(path)}: directly in tests/")
        elif {"unit", "integration"} & set(parts[:-1]):
            misplaced.append(f"{_rel(path)}: in a folder named unit/ or integration/")
        elif parts[0] in NO_TESTS:
            misplaced.append(f"{_rel(path)}: tests/{parts[0]}/ holds no test module")
        elif parts[0] not in packages | NOT_PACKAGES:
            misplaced.append(f"{_rel(path)}: tests/{parts[0]}/ is no package of ca_daemon/")
    assert not misplaced, "\n".join(misplaced)


def test_only_tests_and_tests_support_are_packages() -> None:
    """Test folders have no __init__.py: pytest imports their modules by path
    (--import-mode=importlib), so two test modules may share a basename."""
    extra = [
        _rel(p)
        for p in _python_files()
        if p.name == "__init__.py"
        and p.parent != TESTS
        and p.relative_to(TESTS).parts[0] != "support"
    ]
    assert not extra, extra
