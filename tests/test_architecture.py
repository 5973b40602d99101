"""The module layout of ARCHITECTURE.md: imports point one way, at module level, and the package
stays light to import."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kgpt"
# The command line imports kgpt's modules inside its commands, so that `kgpt --help` stays fast.
LAZY = {"cli", "__init__", "__main__"}


def _imports():
    """`{module: [(imported kgpt module, at module level?), ...]}` for every module of kgpt."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    found = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        edges = []
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kgpt"):
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            targets = {n.split(".")[1] for n in names if n.startswith("kgpt.")} & modules
            edges += [(target, id(node) in top) for target in targets - {path.stem}]
        found[path.stem] = edges
    return found


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


def test_importing_kgpt_and_its_command_line_does_not_import_tensorflow():
    script = "import sys, kgpt, kgpt.cli; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
