"""The layout's rules: script -> application -> library, and an install that carries both packages."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMPORTS_TRAIN = re.compile(r"^\s*(import train\b|from train import)", re.M)
IMPORTS_MODELS = re.compile(r"^\s*(import models\b|from models\b)", re.M)


def python_files(*folders):
    for folder in folders:
        yield from (path for path in (ROOT / folder).rglob("*.py") if ".venv" not in path.parts)


def test_only_the_command_lines_own_tests_import_train_py():
    importers = [str(path.relative_to(ROOT)) for path in python_files("tinyattn", "models", "benchmarks", "experiments")
                 if IMPORTS_TRAIN.search(path.read_text())]
    assert importers == [], f"train.py is the command line only; these import it: {importers}"


def test_the_library_imports_nothing_of_the_application():
    importers = [str(path.relative_to(ROOT)) for path in python_files("tinyattn") if IMPORTS_MODELS.search(path.read_text())]
    assert importers == [], f"tinyattn must not depend on models/: {importers}"


def test_train_py_holds_no_training_code():
    """Flags to a Config, then a call: the run, the loop and evaluation live in the models package."""
    source = (ROOT / "train.py").read_text()
    for definition in ("class Run", "def forward_backward", "def evaluate", "def shards_for", "checkpoint.save("):
        assert definition not in source


def test_an_install_carries_models_and_tinyattn(tmp_path):
    """From a folder outside the checkout, `import models, tinyattn` finds the installed packages (CI installs with
    `pip install .`, not editable). Where the checkout is not installed at all, there is nothing to check."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    def importable(name):
        probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({name!r}) else 1)"
        return subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=environment).returncode == 0

    if not importable("tinyattn"):
        pytest.skip("tinyattn is not installed in this Python (run the README's install command)")
    result = subprocess.run([sys.executable, "-c", "import models, models.training, tinyattn; print(models.__file__)"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _imports_of(path, package):
    """The tinyattn modules one module imports at its top level (relative or absolute)."""
    import ast
    here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")[:-node.level] if path.name != "__init__.py" else here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith(package):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(package))
    return found


def test_tinyattns_modules_import_each_other_without_a_cycle():
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in python_files("tinyattn")}
    graph = {name: {m for m in _imports_of(path, "tinyattn") if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules is the package being assembled, not a cycle.
    graph = {name: {m for m in targets if not m.startswith(name + ".")} for name, targets in graph.items()}
    state = {}

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(trail + [name, target])}")
            if target not in state:
                visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
