"""Who may import whom (DESIGN.md, "Who may import whom"), checked on the source.

Static: every `import` / `from ... import` in a package's files is read with `ast`,
so the check holds for code paths a test never runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "shared": {"torch", "PySide6", "pyqtgraph", "transformers", "peft", "executorch", "export", "desktop", "device_agent"},
    "export": {"PySide6", "pyqtgraph", "desktop", "device_agent"},
    "device_agent": {"PySide6", "pyqtgraph", "transformers", "peft", "export", "desktop"},
    "desktop": set(),
}
# Qt only inside the view package.
QT_MODULES = {"PySide6", "pyqtgraph"}
QT_ALLOWED_PREFIX = "desktop/ui/"


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_it_may(package: str) -> None:
    files = package_files(package)
    assert files, f"{package}/ has no Python files"
    offences = []
    for path in files:
        bad = imported_roots(path) & FORBIDDEN[package]
        if bad:
            offences.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offences, "\n".join(offences)


def test_qt_only_in_view_package() -> None:
    offences = []
    for package in FORBIDDEN:
        for path in package_files(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(QT_ALLOWED_PREFIX):
                continue
            bad = imported_roots(path) & QT_MODULES
            if bad:
                offences.append(f"{rel} imports {sorted(bad)}")
    assert not offences, "\n".join(offences)


def test_desktop_uses_only_the_public_device_agent_modules() -> None:
    # desktop may use device_agent's public trainer, never its server internals.
    allowed = {"device_agent", "device_agent.trainer", "device_agent.program"}
    offences = []
    for path in package_files("desktop"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("device_agent") and name not in allowed:
                    offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offences, "\n".join(offences)
