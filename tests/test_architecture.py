"""The package's shape, read statically with ``ast`` (nothing is imported or run).

The rules are those of docs/architecture.md: no import cycles; core's layers import one way
only, bottom to top; core never imports Qt or napari; the CLI modules never import the CLI
package's ``__init__``; private widget modules stay inside widgets/; and no function grows over
80 lines nor class over 300. Imports inside functions count too: a lazy import is still a
dependency, only a later one.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import napari_histo_wsss

PACKAGE_DIR = Path(napari_histo_wsss.__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name
CORE = f"{PACKAGE}.core"

#: core's layers, bottom to top; a module may import its own layer or lower ones. Names are
#: relative to core: a subpackage stands for all its modules.
CORE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "events", "devices", "registry"),
    ("config", "data"),
    ("runs",),
    ("models",),
    ("training",),
    ("inference",),
    ("stage1", "stage2", "wsi"),
    ("hisynseg", "corrections"),
    ("pipeline",),
    ("",),  # core/__init__.py: the public API
)

#: The top-level parts of one layer that do not import each other (independent stages).
INDEPENDENT_PEERS = {"stage1", "stage2", "wsi"}

#: Imports between independent peers that are justified, with the reason (empty today).
PEER_EXCEPTIONS: dict[tuple[str, str], str] = {}

GUI_PACKAGES = {"qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui",
                "pyqtgraph", "napari"}

FUNCTION_MAX_LINES = 80
CLASS_MAX_LINES = 300


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    #: Modules of this package it imports (resolved to the deepest existing module).
    internal: set[str] = field(default_factory=set)
    #: Top-level names of the other packages it imports.
    external: set[str] = field(default_factory=set)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: Module, level: int, target: str | None) -> str:
    """The absolute dotted name of a (possibly relative) ``from ... import``."""
    if level == 0:
        return target or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _deepest_existing(name: str, names: set[str]) -> str | None:
    while name and name not in names:
        name = name.rpartition(".")[0]
    return name or None


@cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = Module(_module_name(path), path, path.name == "__init__.py")
        found[module.name] = module
    names = set(found)
    for module in found.values():
        for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, node.level, node.module)
                targets = [_from_import_target(base, alias.name, found)
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != PACKAGE:
                    module.external.add(target.split(".")[0])
                    continue
                imported = _deepest_existing(target, names)
                if imported and imported != module.name:
                    module.internal.add(imported)
    return found


def _from_import_target(base: str, name: str, found: dict[str, Module]) -> str:
    """What ``from base import name`` reads: the submodule ``base.name``, unless the package's
    ``__init__`` binds ``name`` itself (``cli`` exports the function ``main``, shadowing the
    module ``cli.main``) or there is no such submodule; then it reads ``base``."""
    package = found.get(base)
    if f"{base}.{name}" in found and not (package and name in _bound_names(package.path)):
        return f"{base}.{name}"
    return base


@cache
def _bound_names(path: Path) -> frozenset[str]:
    """Names a module's top level binds by import, definition or assignment."""
    bound = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Assign):
            bound |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return frozenset(bound)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _core_part(name: str) -> str | None:
    """The top-level part of core a module belongs to ("stage1", "errors", "" for core itself)."""
    if name == CORE:
        return ""
    if name.startswith(CORE + "."):
        return name[len(CORE) + 1:].split(".")[0]
    return None


def _layer_of(part: str) -> int:
    for rank, layer in enumerate(CORE_LAYERS):
        if part in layer:
            return rank
    raise AssertionError(f"core.{part} is in no layer: add it to CORE_LAYERS and the docs")


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name


def test_the_import_walk_sees_the_package():
    found = modules()
    assert f"{CORE}.pipeline" in found
    assert f"{CORE}.errors" in found[f"{CORE}.registry"].internal
    assert "torch" in found[f"{CORE}.models.classifier"].external


def test_no_import_cycles():
    graph = {}
    for name, module in modules().items():
        # A module importing its own package's __init__ is how Python loads it, not a cycle.
        graph[name] = {target for target in module.internal
                       if not name.startswith(target + ".")}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_core_part_has_a_layer():
    for name in modules():
        part = _core_part(name)
        if part is not None:
            _layer_of(part)


def test_core_layers_import_downwards_only():
    wrong = []
    for name, module in modules().items():
        part = _core_part(name)
        if part is None:
            continue
        for target in module.internal:
            target_part = _core_part(target)
            if target == PACKAGE:
                continue  # the top-level package holds only ``__version__``
            if target_part is None:
                wrong.append(f"{_short(name)} imports {_short(target)}, outside core")
            elif target_part == part:
                continue
            elif _layer_of(target_part) > _layer_of(part):
                wrong.append(f"{_short(name)} (layer {_layer_of(part)}) imports "
                             f"{_short(target)} (layer {_layer_of(target_part)})")
            elif {part, target_part} <= INDEPENDENT_PEERS \
                    and (part, target_part) not in PEER_EXCEPTIONS:
                wrong.append(f"{_short(name)} imports its peer stage {_short(target)}")
    assert wrong == [], "\n".join(wrong)


def test_core_imports_neither_qt_nor_napari():
    wrong = {_short(name): sorted(module.external & GUI_PACKAGES)
             for name, module in modules().items()
             if _core_part(name) is not None and module.external & GUI_PACKAGES}
    assert wrong == {}


def test_cli_modules_do_not_import_the_cli_package():
    cli = f"{PACKAGE}.cli"
    wrong = [_short(name) for name, module in modules().items()
             if name.startswith(cli + ".") and cli in module.internal]
    assert wrong == []


def test_private_widget_modules_stay_inside_widgets():
    widgets = f"{PACKAGE}.widgets"
    wrong = []
    for name, module in modules().items():
        if name == widgets or name.startswith(widgets + "."):
            continue
        wrong += [f"{_short(name)} imports {_short(target)}" for target in module.internal
                  if target.startswith(widgets + "._")]
    assert wrong == []


def test_no_function_over_80_lines_nor_class_over_300():
    too_long = []
    for module in modules().values():
        for node in ast.walk(ast.parse(module.path.read_text())):
            if isinstance(node, ast.ClassDef):
                limit = CLASS_MAX_LINES
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = FUNCTION_MAX_LINES
            else:
                continue
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > limit:
                relative = module.path.relative_to(PACKAGE_DIR.parent)
                too_long.append(f"{relative}:{node.lineno} {node.name}: {lines} lines "
                                f"(limit {limit})")
    assert too_long == [], "\n".join(too_long)
