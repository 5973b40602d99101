"""The package layout of ARCHITECTURE.md: subpackages in one import order, imports at module level,
no cycle, modules of a readable size, and a package that stays light to import."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kgpt"
# The command line imports kgpt's modules inside its commands, so that `kgpt --help` stays fast;
# the package's `__init__` registers Keras classes lazily, once Keras is imported.
LAZY = {"kgpt.cli", "kgpt", "kgpt.__main__"}
# Units in import order, lowest first: a module may import its own unit and the units before it.
LAYERS = [
    {"kgpt.files", "kgpt.environment", "kgpt.keras_compat", "kgpt.config"},
    {"kgpt.tokenizers"},
    {"kgpt.data"},
    {"kgpt.model"},
    {"kgpt.recipe", "kgpt.rundir"},
    {"kgpt.generation"},
    {"kgpt.training"},
    {"kgpt.serving"},
    {"kgpt.evaluate", "kgpt.gpt2"},
    {"kgpt.cli", "kgpt.__main__", "kgpt"},
]
MAX_LINES = 520


def _name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """`{module: [(imported kgpt module, at module level?), ...]}` for every module of kgpt."""
    paths = {_name(path): path for path in PACKAGE.rglob("*.py")}
    found = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        edges = []
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kgpt"):
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            targets = {n for n in names if n in paths and n != "kgpt"}
            edges += [(target, id(node) in top) for target in targets - {name}]
        found[name] = edges
    return found


def _layer(module):
    for index, units in enumerate(LAYERS):
        if any(module == unit or module.startswith(unit + ".") for unit in units if unit != "kgpt"):
            return index
    return len(LAYERS) - 1 if module == "kgpt" else None


def test_every_module_belongs_to_a_layer():
    assert [module for module in _imports() if _layer(module) is None] == []


def test_imports_point_down_the_layers():
    upward = [
        f"{module} imports {target}"
        for module, edges in _imports().items() if module not in LAZY
        for target, _ in edges if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_kgpt_modules_import_each_other_at_module_level_only():
    nested = [
        f"{module} imports {target} inside a function"
        for module, edges in _imports().items() if module not in LAZY
        for target, at_top in edges if not at_top
    ]
    assert nested == []


def test_there_is_no_import_cycle():
    graph = {module: {target for target, _ in edges} for module, edges in _imports().items()}
    visiting, done, cycles = [], set(), []

    def visit(module):
        if module in visiting:
            cycles.append(visiting[visiting.index(module):] + [module])
            return
        if module in done:
            return
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == []


def test_modules_stay_readable_in_size():
    long = {_name(path): n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_importing_kgpt_and_its_command_line_does_not_import_tensorflow():
    script = "import sys, kgpt, kgpt.cli; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
