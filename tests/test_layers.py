"""The packages import one another only downwards, as docs/ARCHITECTURE.md draws them: common/
imports none of ours; lalms/ only common/; datamodules/ and editors/ common/ and lalms/ (never
each other: both use the records in common/); the rest may use any of those."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "lalms", "datamodules", "editors", "evaluation", "lit_modules", "analysis", "cli")
ALLOWED = {
    "common": set(),
    "lalms": {"common"},
    "datamodules": {"common", "lalms"},
    "editors": {"common", "lalms"},
}


def imports(path: Path) -> set[str]:
    """The packages of ours a file imports, at any depth (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_packages_import_only_the_layers_below():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for other in sorted(imports(path) - allowed - {package}):
                wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not wrong, "\n".join(wrong)
