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
    "_keras_compat",
    "_tensorboard",
    "_distribution",
    "_io",
    "_fs",
    "_steps",
    "_lock",
    "_deprecation",
    "_scoring",
    "schedule",
    "checkpoint",
    "manifest",
    "loading",
    "ensemble",
    "export",
    "batchnorm",
    "layers",
    "weight_averaging",  # A shim: the old names of `averaging`.
    "averaging",
    "fge",
    "distill",
    "freezeout",
    "example_data",
}
ANALYSIS = {"metrics", "selection"}
LEVEL = {**{m: 0 for m in CORE}, **{m: 1 for m in ANALYSIS}, "app": 2}


def module_name(path):
    relative = os.path.relpath(path, PACKAGE)[: -len(".py")]
    parts = relative.split(os.sep)
    return ".".join(p for p in parts if p != "__init__")


def imported_modules(path):
    """`keras_snapshot` submodules imported anywhere in the file."""
    return {name.split(".")[0] for name in imported_names(path)}


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


def imported_names(path):
    """Dotted names under `keras_snapshot.` the file imports, anywhere.

    `from keras_snapshot.app import run` gives `app` and `app.run`; the
    caller keeps the names that are modules.
    """
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
            if name.startswith("keras_snapshot."):
                found.add(name[len("keras_snapshot.") :])
    return found


def import_graph():
    """`{module: modules it imports}`, `app` split into its submodules.

    A node is a core or analysis module (`schedule`, `metrics`, ...) or
    one module of the application (`app.train`, `app.freezeout_job`, ...),
    so that a cycle inside `app/` is a cycle here. An imported name counts
    as the longest module it starts with (`app.train.run_config` is
    `app.train`). The package root and `__main__` are left out: the root
    imports lazily and may import anything.
    """
    paths = {
        name: path
        for name, path in package_modules()
        if top(name) in LEVEL and name
    }

    def module_of(name):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in paths:
                return ".".join(parts[:end])
        return None

    graph = {}
    for name, path in paths.items():
        targets = {module_of(n) for n in imported_names(path)}
        graph[name] = targets - {None, name}
    return graph


def find_cycle(graph):
    """An import cycle of `graph` as `[a, b, ..., a]`, or None."""
    visiting, done = [], set()

    def visit(node):
        if node in done:
            return None
        if node in visiting:
            return visiting[visiting.index(node) :] + [node]
        visiting.append(node)
        for child in sorted(graph.get(node, ())):
            cycle = visit(child)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {find_cycle(graph)}"


def _app_module_aliases(tree):
    """`{alias: app module}` bound by the file's imports of app modules."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == (
            "keras_snapshot.app"
        ):
            for a in node.names:
                aliases[a.asname or a.name] = f"app.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("keras_snapshot.app.") and a.asname:
                    aliases[a.asname] = a.name[len("keras_snapshot.") :]
    return aliases


def test_no_app_module_uses_another_app_modules_private_names():
    problems = []
    for name, path in package_modules():
        if top(name) != "app":
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        aliases = _app_module_aliases(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("keras_snapshot.app.")
                and node.module != f"keras_snapshot.{name}"
            ):
                problems += [
                    f"{name} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != name
                and node.attr.startswith("_")
            ):
                problems.append(
                    f"{name} uses {aliases[node.value.id]}.{node.attr}"
                )
    assert not problems, problems
