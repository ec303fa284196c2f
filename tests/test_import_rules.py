"""Who may import whom (docs/design.md, "Packages"), checked on the source.

Static: every `import` / `from ... import` in a package's files (relative ones
resolved, `importlib.import_module("...")` with a literal name included) is read
with `ast`, so the check holds for code paths a test never runs.

Each package has an **allow-list** of import roots: the standard library
(`sys.stdlib_module_names`), its own package, and the packages named below. On
top of the roots, a few rules look at the full dotted name or at where the file
lives (`RULES`). The device agent's list is exactly its `agent` extra in
pyproject.toml (plus shared), so what an agent imports is what
`pip install "deftly[agent]"` installs.
"""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "export", "device_agent", "desktop")

# The device agent's third-party imports: the `agent` extra, by import name.
AGENT_EXTRA = {"numpy", "torch", "executorch", "websockets", "zeroconf", "psutil", "safetensors", "tokenizers",
               "cryptography"}  # cryptography makes --tls's certificate, once

ALLOWED: dict[str, set[str]] = {
    "shared": {"shared", "numpy"},
    "export": {"export", "shared", "numpy", "torch", "transformers", "peft", "executorch", "torchao",
               "safetensors", "tqdm", "matplotlib"},
    "device_agent": {"device_agent", "shared"} | AGENT_EXTRA,
    "desktop": {"desktop", "shared", "export", "device_agent", "numpy", "tqdm", "matplotlib", "websockets",
                "zeroconf", "torch", "PySide6", "pyqtgraph",
                "psutil"},  # bench agent reads an agent process's memory and CPU time
}

# pyproject's distribution names that import under another name.
IMPORT_NAME = {"PySide6-Essentials": "PySide6"}


@dataclass(frozen=True)
class Rule:
    """A package's import of ``root`` must satisfy ``ok(dotted name, file path relative to ROOT)``."""

    package: str
    root: str
    ok: Callable[[str, str], bool]
    why: str


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


RULES = (
    Rule("device_agent", "executorch", lambda name, _: _within(name, "executorch.extension.pybindings"),
         "only ExecuTorch's native runtime extension, executorch.extension.pybindings "
         "(executorch.runtime and executorch.exir import the whole exporter)"),
    Rule("device_agent", "torch", lambda name, _: name == "torch",
         "torch only as the runtime's tensor type: `import torch`, no torch submodule"),
    Rule("desktop", "device_agent",
         lambda name, _: any(_within(name, m) for m in ("device_agent.trainer", "device_agent.program",
                                                          "device_agent.profile")),
         "only device_agent's public trainer, program and profile modules, never its server internals"),
    Rule("desktop", "PySide6", lambda _, path: path.startswith("desktop/ui/"), "Qt only under desktop/ui/"),
    Rule("desktop", "pyqtgraph", lambda _, path: path.startswith("desktop/ui/"), "Qt only under desktop/ui/"),
    Rule("desktop", "torch", lambda _, path: path.startswith("desktop/bench/"),
         "torch only under desktop/bench/ (the eager baselines and FLOP counts)"),
)


# -- reading imports ------------------------------------------------------------------


def _is_module(dotted: str, root: Path) -> bool:
    """Whether ``dotted`` names a module or package (rather than an attribute), found on disk.

    The project's packages are looked up under ``root``, others where Python would
    find their top-level package; nothing is imported.
    """
    top, *rest = dotted.split(".")
    if (root / top).is_dir():
        bases = [root / top]
    else:
        spec = importlib.util.find_spec(top)
        if spec is None or spec.submodule_search_locations is None:
            return False
        bases = [Path(p) for p in spec.submodule_search_locations]
    suffixes = importlib.machinery.all_suffixes()
    for base in bases:
        path = base
        for i, part in enumerate(rest):
            last = i == len(rest) - 1
            if (path / part).is_dir():
                path = path / part
            elif last and any((path / (part + s)).exists() for s in suffixes):
                return True
            else:
                break
        else:
            return True
    return False


def imported_names(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in ``path``.

    ``from M import a`` yields ``M.a`` when ``a`` is a submodule, and ``M`` when it
    is an attribute of M; relative imports are resolved against the file's package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = list(path.relative_to(root).parts[:-1])  # the package a relative import starts from
    names: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 >= len(package):  # above the top-level packages: outside the project
                    names.append((node.lineno, "." * node.level + (node.module or "")))
                    continue
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}", root)]
            names.extend((node.lineno, name) for name in submodules)
            if len(submodules) < len(node.names):
                names.append((node.lineno, module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _called(node) in ("importlib.import_module", "__import__")):
            names.append((node.lineno, node.args[0].value))
    return names


def _called(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def offences(root: Path, package: str) -> list[str]:
    """Every import in ``root/package`` that its allow-list or a rule refuses, one line each."""
    allowed = ALLOWED[package]
    found = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for line, name in imported_names(path, root):
            top = name.split(".")[0]
            if not top:
                found.append(f"{rel}:{line}: relative import {name!r} leaves the project's packages")
            elif top not in allowed and top not in sys.stdlib_module_names:
                found.append(f"{rel}:{line}: imports {name}, not on {package}'s list {sorted(allowed)}")
            else:
                for rule in RULES:
                    if rule.package == package and rule.root == top and not rule.ok(name, rel):
                        found.append(f"{rel}:{line}: imports {name}: {rule.why}")
    return found


# -- the project ----------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_it_may(package: str) -> None:
    assert list((ROOT / package).rglob("*.py")), f"{package}/ has no Python files"
    found = offences(ROOT, package)
    assert not found, "\n".join(found)


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        dist = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
        names.add(IMPORT_NAME.get(dist, dist.replace("-", "_")))
    return names


def test_the_agents_list_is_its_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert _requirement_names(extras["agent"]) == AGENT_EXTRA


def test_every_allowed_package_is_installed_by_the_packages_extra() -> None:
    # What a package may import must come with its install: the base dependencies plus its extra.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def installed(extra: str) -> set[str]:
        names = _requirement_names(project["dependencies"])
        for requirement in extras[extra]:
            nested = re.fullmatch(r"deftly\[(.+)\]", requirement)
            names |= set().union(*(installed(e.strip()) for e in nested.group(1).split(","))) if nested \
                else _requirement_names([requirement])
        return names

    for package, extra in (("export", "export"), ("device_agent", "agent"), ("desktop", "desktop")):
        missing = ALLOWED[package] - set(PACKAGES) - installed(extra)
        assert not missing, f"{package} may import {sorted(missing)}, which the {extra!r} extra does not install"
    assert ALLOWED["shared"] - set(PACKAGES) <= _requirement_names(project["dependencies"])


# -- the checker itself, on a made-up tree ------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name in [f"{package}/__init__.py" for package in PACKAGES] + ["device_agent/trainer.py",
                                                                      "device_agent/program.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    return tmp_path


@pytest.mark.parametrize("package, source, expected", [
    ("shared", "import psutil", "imports psutil, not on shared's list"),
    ("shared", "import torch", "imports torch, not on shared's list"),
    ("shared", "from export.prge import PrgeProgram", "imports export.prge, not on shared's list"),
    ("device_agent", "import executorch.exir", "executorch.extension.pybindings"),
    ("device_agent", "from executorch.runtime import Runtime", "executorch.extension.pybindings"),
    ("device_agent", "from executorch import runtime", "executorch.extension.pybindings"),
    ("device_agent", "import torchao", "imports torchao, not on device_agent's list"),
    ("device_agent", "import matplotlib.pyplot as plt", "imports matplotlib.pyplot, not on device_agent's list"),
    ("device_agent", "from torch import nn", "no torch submodule"),
    ("device_agent", "import transformers", "not on device_agent's list"),
    ("device_agent", "from export.program import export_program", "not on device_agent's list"),
    ("device_agent", "import importlib\nimportlib.import_module('peft')", "imports peft, not on"),
    ("device_agent", "def f():\n    import desktop.cli", "imports desktop.cli, not on"),
    ("desktop", "from device_agent.server import Server", "never its server internals"),
    ("desktop", "from device_agent import server", "never its server internals"),
    ("desktop", "from PySide6 import QtWidgets", "Qt only under desktop/ui/"),
    ("desktop", "import pyqtgraph", "Qt only under desktop/ui/"),
    ("desktop", "import torch", "torch only under desktop/bench/"),
    ("export", "from desktop.cli import main", "imports desktop.cli, not on export's list"),
    ("export", "from ... import anything", "leaves the project's packages"),
])
def test_the_checker_refuses_a_bad_import(tmp_path, package: str, source: str, expected: str) -> None:
    root = _tree(tmp_path, {f"{package}/bad.py": source + "\n"})
    found = offences(root, package)
    assert len(found) == 1 and expected in found[0] and f"{package}/bad.py" in found[0], found


def test_the_checker_lets_allowed_imports_pass(tmp_path) -> None:
    root = _tree(tmp_path, {
        "shared/ok.py": "from __future__ import annotations\nimport json, os.path\nimport numpy as np\nfrom . import ok\n",
        "device_agent/ok.py": "import torch\nimport executorch.extension.pybindings._C as native\n"
                              "from executorch.extension.pybindings import _C\nimport psutil, websockets, zeroconf\n"
                              "from shared.errors import InputError\nfrom .ok import x\n",
        "desktop/ui/view.py": "from PySide6 import QtWidgets\nimport pyqtgraph\n",
        "desktop/bench/b.py": "import torch\nfrom device_agent.trainer import lr_at\nfrom device_agent import program\n",
        "export/ok.py": "import executorch.exir\nfrom torchao.quantization import quantize_\nimport peft, transformers\n",
    })
    for package in PACKAGES:
        assert offences(root, package) == [], package
