"""The shape users and contributors rely on: the two entry points and the retry policy at the top level, the rest in
one package without import cycles, the lab (replay lab, fake upstreams, harness) in a subpackage the runtime never
imports, the benchmarks a package that leaves sys.path alone, and every addon named seaking.* (mitmproxy's addon names
and sys.path are shared with other scripts)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import addon
from seaking.shared import Shared

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "seaking"
LAB = PACKAGE / "lab"


def test_only_the_entries_and_the_retry_policy_sit_at_the_top_level():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["addon.py", "replay.py", "retry_policy.py"]


def imports_of(path: Path) -> set[str]:
    """The project modules a module imports when it runs (seaking.x or retry_policy), as module names. Imports for
    type checking only (under `if TYPE_CHECKING:`) make no cycle: an addon names the Shared it is given that way."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("seaking.") or name == "retry_policy"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_the_package_has_no_import_cycles():
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
    graph["retry_policy"] = imports_of(ROOT / "retry_policy.py")
    assert graph["retry_policy"] == set()  # pure: the package builds on it, never the other way round

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        for imported in graph.get(module, ()):
            found = cycle_from(imported, path + [module])
            if found:
                return found
        return None

    for module in graph:
        assert cycle_from(module, []) is None


def test_the_retry_policy_is_pure():
    """The standard library and tenacity only: what the HTTP client raises is judged beside it (connections.py)."""
    tree = ast.parse((ROOT / "retry_policy.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    top_level = {name.partition(".")[0] for name in imported}
    assert top_level - {"__future__", "tenacity"} <= sys.stdlib_module_names, top_level


def test_every_addon_of_the_pipeline_is_named_seaking_something():
    names = [getattr(a, "name", None) for a in addon.pipeline()]
    assert all(name and name.startswith("seaking.") for name in names), names
    assert len(set(names)) == len(names)


def test_the_replay_labs_upstream_addons_are_named_seaking_something_too():
    from seaking.lab import recorded_faults

    assert all(a.name.startswith("seaking.") for a in recorded_faults.addons)


def test_the_runtime_never_imports_the_lab():
    """What mitmdump -s addon.py loads is the product; the lab's tools sit beside it (as mitmproxy/tools/ and
    mitmproxy/test/ do beside mitmproxy's addons)."""
    runtime = [ROOT / "addon.py", ROOT / "retry_policy.py", *PACKAGE.glob("*.py")]
    for path in runtime:
        assert not {name for name in imports_of(path) if name.startswith("seaking.lab")}, path.name


def test_the_labs_map_names_each_of_its_modules():
    import seaking.lab

    modules = sorted(p.name for p in LAB.glob("*.py") if p.stem != "__init__")
    assert modules and all(f"  {name} ." in seaking.lab.__doc__ for name in modules), modules


def uses_sys_path(path: Path) -> bool:
    return any(
        isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_the_lab_and_the_benchmarks_leave_sys_path_alone():
    """They import the project as packages (run from the project's root: python -m benchmarks.bench)."""
    assert (ROOT / "benchmarks" / "__init__.py").exists()
    scripts = [*LAB.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    assert [p.name for p in scripts if uses_sys_path(p)] == []


def test_an_addon_that_reads_the_config_before_settings_loaded_it_is_told_the_order():
    with pytest.raises(RuntimeError, match="the Settings addon must come first"):
        Shared().snapshot
