"""The package's layers: imports only go down, and there is no cycle.

Every `import` and `from ... import` of every module is read with `ast`,
inside functions too, so that a local import cannot hide a cycle.
"""

import ast
import os

import keras_snapshot

PACKAGE = os.path.dirname(keras_snapshot.__file__)
CORE = {
    "_checks",
    "_distribution",
    "_io",
    "_fs",
    "schedule",
    "checkpoint",
    "manifest",
    "loading",
    "ensemble",
    "batchnorm",
    "layers",
    "averaging",
    "fge",
    "distill",
    "freezeout",
}
ANALYSIS = {"metrics", "selection"}
LEVEL = {**{m: 0 for m in CORE}, **{m: 1 for m in ANALYSIS}, "app": 2}


def module_name(path):
    relative = os.path.relpath(path, PACKAGE)[: -len(".py")]
    parts = relative.split(os.sep)
    return ".".join(p for p in parts if p != "__init__")


def imported_modules(path):
    """`keras_snapshot` submodules imported anywhere in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [
                f"{node.module}.{a.name}" for a in node.names
            ]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "keras_snapshot" and len(parts) > 1:
                found.add(parts[1])
    return found


def package_modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield module_name(path), path


def top(name):
    return name.split(".")[0] if name else ""


def test_every_module_has_a_layer():
    for name, _ in package_modules():
        if name in ("", "__main__"):
            continue
        assert top(name) in LEVEL, f"{name} has no layer in the test"


def test_imports_only_go_down():
    for name, path in package_modules():
        if top(name) not in LEVEL:
            continue  # The package root and __main__ may import anything.
        level = LEVEL[top(name)]
        for target in imported_modules(path):
            if target in LEVEL and target != top(name):
                assert LEVEL[target] <= level, (
                    f"{name} (layer {level}) imports {target} "
                    f"(layer {LEVEL[target]})"
                )


def test_no_import_cycle_between_modules():
    graph = {}
    for name, path in package_modules():
        if top(name) in LEVEL and "." not in name:
            graph[name] = {
                t for t in imported_modules(path) if t in LEVEL and t != name
            }
    visiting, done = set(), set()

    def visit(node, trail):
        if node in done:
            return
        assert node not in visiting, f"import cycle: {trail + [node]}"
        visiting.add(node)
        for child in graph.get(node, ()):
            visit(child, trail + [node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])
