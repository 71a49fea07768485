"""The layout's rules, read from the source (nothing is imported or run):

* every store is constructed in ``src/hematovision/stores.py`` and nowhere else in the library or
  the flows, so moving a store is a change in one place;
* the library never imports the Prefect flows (``flows/`` imports ``hematovision``, not the reverse);
  only the entry points that run flows for a person (``ENTRY_POINTS``: the CLI and the demo) do;
* project imports sit at the top of their module, where a reader sees what a module needs, except
  the few project modules that load TensorFlow or MLflow when imported (``LAZY_PROJECT_MODULES``);
* every ``# noqa`` says why;
* no module of the library or the flows grows past ``MAX_MODULE_LINES`` (``LONG_MODULES`` lists the
  current exceptions, each with its reason).

Each assertion lists every violation as ``path:line``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "hematovision"
FLOWS = REPO / "flows"
STORES_MODULE = PACKAGE / "stores.py"

# The classes behind the platform's stores; only stores.py calls them.
STORE_CLASSES = frozenset(
    {
        "Registry",
        "EmbeddingCache",
        "PredictionStore",
        "Accounts",
        "Corrections",
        "MonitorState",
        "Workspace",
        "RemoteWorkspace",
    }
)

# Project modules that may be imported inside a function: importing them loads TensorFlow (seconds,
# and hundreds of MB), which the service's light paths, the CLI's other commands and the monitor
# never need. Each must really load TensorFlow when imported (checked below), so the list cannot rot.
LAZY_PROJECT_MODULES = {
    "hematovision.model.backbone": "imports keras (TensorFlow) to build EfficientNet-Lite0",
    "hematovision.training.train": "imports keras (TensorFlow) to train",
    "hematovision.registry.packaging": "imports MLflow's pyfunc (seconds) to define the model's pyfunc class",
}
# Libraries that take seconds to import: a project module that loads one when imported is imported
# where it is used, so the CLI, the pages and the unit tests do not pay for it.
TENSORFLOW = frozenset({"tensorflow", "keras", "tf_keras", "mlflow"})
# The entry points that start flows for a person (`hematovision run`, `hematovision demo`): they sit
# above the flows, as the flows sit above the library.
ENTRY_POINTS = frozenset({*(PACKAGE / "cli").glob("*.py"), PACKAGE / "demo.py"})

# Modules longer than this are split by what they do (the layout's "one room per step").
MAX_MODULE_LINES = 500
# Current exceptions, path -> reason; a module listed here that has come back under the limit must
# leave the list.
LONG_MODULES: dict[str, str] = {}

NOQA = re.compile(r"#\s*noqa\b(?P<codes>\s*:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(?P<rest>.*)", re.IGNORECASE)


def python_files(*folders: Path) -> list[Path]:
    return sorted(
        p
        for folder in folders
        if folder.is_dir()
        for p in folder.rglob("*.py")
        if "__pycache__" not in p.parts and ".venv" not in p.parts
    )


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO).as_posix()}:{line}"


@cache
def parsed(path: Path) -> ast.Module:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return tree


def module_name(path: Path) -> str:
    base = path.relative_to(PACKAGE.parent if path.is_relative_to(PACKAGE) else REPO).with_suffix("")
    parts = base.parts[:-1] if base.name == "__init__" else base.parts
    return ".".join(parts)


def imported_modules(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """The absolute names an import statement loads (``from a import b`` may load ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def is_project(name: str) -> bool:
    return name == "hematovision" or name.startswith("hematovision.")


def enclosing_scope(node: ast.AST) -> ast.AST | None:
    """The function or class the node is inside, or None at module level (``if``/``try`` included)."""
    parent = getattr(node, "parent", None)
    while parent is not None:
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return parent
        parent = getattr(parent, "parent", None)
    return None


# --- stores -----------------------------------------------------------------------------------------
def test_only_stores_py_constructs_a_store():
    violations = []
    for path in python_files(PACKAGE, FLOWS):
        if path == STORES_MODULE:
            continue
        tree = parsed(path)
        names = set(STORE_CLASSES)
        for node in ast.walk(tree):  # `from x import Registry as R` constructs through R
            if isinstance(node, ast.ImportFrom):
                names |= {a.asname for a in node.names if a.name in STORE_CLASSES and a.asname}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if called in names:
                violations.append(f"{where(path, node.lineno)}: {called}(...)")
    assert not violations, (
        "stores are constructed outside src/hematovision/stores.py (open them through "
        "`hematovision.stores`):\n" + "\n".join(violations)
    )


# --- imports ----------------------------------------------------------------------------------------
def test_the_library_never_imports_the_flows():
    violations = []
    for path in python_files(PACKAGE):
        if path in ENTRY_POINTS:
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [n for n in imported_modules(node, path) if n == "flows" or n.startswith("flows.")]
            elif (
                isinstance(node, ast.Call)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and (
                    getattr(node.func, "attr", None) == "import_module"
                    or getattr(node.func, "id", None) in ("import_module", "__import__")
                )
            ):
                names = [node.args[0].value] if node.args[0].value.split(".")[0] == "flows" else []
            else:
                continue
            violations += [f"{where(path, node.lineno)}: imports {names[0]}"] if names else []
    assert not violations, (
        "src/hematovision imports the Prefect flows (flows/ builds on the library, "
        "never the reverse):\n" + "\n".join(violations)
    )


def top_level_imports(path: Path) -> set[str]:
    """Every module the file's module-level code imports (``if``/``try`` blocks included)."""
    return {
        name
        for node in ast.walk(parsed(path))
        if isinstance(node, (ast.Import, ast.ImportFrom)) and enclosing_scope(node) is None
        for name in imported_modules(node, path)
    }


def project_path(name: str) -> Path | None:
    relative = Path(*name.split("."))
    for candidate in (PACKAGE.parent / relative.with_suffix(".py"), PACKAGE.parent / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def loads_tensorflow(name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing the project module ``name`` imports TensorFlow or MLflow (through its
    module-level imports)."""
    path = project_path(name)
    if path is None or name in seen:
        return False
    imports = top_level_imports(path)
    parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return any(i.split(".")[0] in TENSORFLOW for i in imports) or any(
        loads_tensorflow(i, seen | {name}) for i in sorted(imports | parents) if is_project(i)
    )


def test_project_imports_are_at_the_top_of_the_module():
    violations = []
    for path in python_files(PACKAGE, FLOWS):
        for node in ast.walk(parsed(path)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or enclosing_scope(node) is None:
                continue
            names = [n for n in imported_modules(node, path) if is_project(n) and project_path(n) is not None]
            if names and not any(n in LAZY_PROJECT_MODULES for n in names):
                scope = enclosing_scope(node)
                violations.append(
                    f"{where(path, node.lineno)}: {names[-1]} imported inside {getattr(scope, 'name', 'a lambda')}()"
                )
    assert not violations, (
        "project modules imported inside a function (move them to the top of the module, "
        "or, if importing them loads TensorFlow or MLflow, add them to LAZY_PROJECT_MODULES with the "
        "reason):\n" + "\n".join(violations)
    )


def test_the_lazily_imported_modules_really_load_tensorflow():
    light = [name for name in LAZY_PROJECT_MODULES if not loads_tensorflow(name)]
    assert not light, (
        f"these modules no longer load TensorFlow or MLflow when imported; import them at the top: {light}"
    )


# --- noqa -------------------------------------------------------------------------------------------
def test_every_noqa_says_why():
    violations = []
    for path in python_files(REPO / "src", FLOWS, REPO / "tests", REPO / "benchmarks"):
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        for token in tokens:
            if token.type != tokenize.COMMENT:
                continue
            match = NOQA.search(token.string)
            if match and not re.search(r"\w", match.group("rest")):
                violations.append(f"{where(path, token.start[0])}: {token.string.strip()}")
    assert not violations, "`# noqa` without a reason (write it after the codes: `# noqa: E402 - why`):\n" + "\n".join(
        violations
    )


# --- module size ------------------------------------------------------------------------------------
def test_no_module_is_over_the_line_limit():
    lengths = {
        path.relative_to(REPO).as_posix(): len(path.read_text().splitlines()) for path in python_files(PACKAGE, FLOWS)
    }
    too_long = [
        f"{path}:{n} lines" for path, n in sorted(lengths.items()) if n > MAX_MODULE_LINES and path not in LONG_MODULES
    ]
    back_under = [path for path in LONG_MODULES if lengths.get(path, 0) <= MAX_MODULE_LINES]
    assert not too_long, (
        f"modules over {MAX_MODULE_LINES} lines (split them by what they do, or list them in "
        "LONG_MODULES with the reason):\n" + "\n".join(too_long)
    )
    assert not back_under, f"no longer over {MAX_MODULE_LINES} lines (or gone): remove from LONG_MODULES: {back_under}"
