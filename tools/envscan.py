"""Which environment variables the code reads, found by reading its syntax tree (no import, no run).

A read is `os.environ.get("X")`, `os.getenv("X")`, `os.environ["X"]`, `"X" in os.environ`, the same on a mapping
named like an environment (`env.get("X")`, `environ["X"]`), or a call of a helper that reads the variable its
argument names (READERS: `read_secret("X")` reads X and X_FILE). A name may also be a loop variable over literal
strings (`for field, name in SLURM_ENV:` with SLURM_ENV a module-level tuple of literals). Any other read whose
name is not a literal is allowed only inside such a helper; anywhere else it is reported, so that no variable
hides from the reference.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fleetscope", "agent", "collector", "dashboards", "alerts")
ENV_NAMES = {"environ", "env", "environment"}  # mappings holding an environment
# Helpers whose first arguments name variables they read: name -> suffixes read for each (X, X_FILE, ...).
READERS = {
    "read_secret": ("", "_FILE"),
    "read_secrets": ("", "_FILE"),
    "_env_int": ("",),  # fleetscope/client.py: the first of several variables that is set
    "_tokens": ("",),  # collector/settings.py
}


@dataclass
class Scan:
    reads: dict[str, set[str]] = field(default_factory=dict)  # variable -> modules reading it
    unresolved: list[str] = field(default_factory=list)  # "path:line: what" for reads with no literal name


def _is_env(node: ast.AST) -> bool:
    """os.environ, or a name/attribute that holds an environment mapping."""
    if isinstance(node, ast.Attribute) and node.attr == "environ":
        return True
    return isinstance(node, ast.Name) and node.id in ENV_NAMES


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, path: str, scan: Scan, tree: ast.Module):
        self.module, self.path, self.scan = module, path, scan
        self.functions: list[str] = []
        # module-level NAME = (literals...), and loop variables bound to their strings
        self.constants = {t.id: s.value for s in tree.body if isinstance(s, ast.Assign)
                          for t in s.targets if isinstance(t, ast.Name)}
        self.loop_names: dict[str, list[str]] = {}

    def _read(self, arg: ast.AST, node: ast.AST, suffixes: tuple[str, ...] = ("",)) -> None:
        name = _literal(arg)
        names = [name] if name is not None else self.loop_names.get(arg.id, []) if isinstance(arg, ast.Name) else []
        for name in names:
            for suffix in suffixes:
                self.scan.reads.setdefault(name + suffix, set()).add(self.module)
        if not names and not (self.functions and self.functions[-1] in READERS):
            self.scan.unresolved.append(f"{self.path}:{node.lineno}: {ast.unparse(node)}")

    def visit_For(self, node: ast.For):
        items = node.iter
        if isinstance(items, ast.Name):
            items = self.constants.get(items.id, items)
        bound: dict[str, list[str]] = {}
        if isinstance(items, (ast.Tuple, ast.List)):
            targets = node.target.elts if isinstance(node.target, ast.Tuple) else [node.target]
            for i, target in enumerate(targets):
                if not isinstance(target, ast.Name):
                    continue
                values = [_literal(e.elts[i] if isinstance(e, ast.Tuple) and len(targets) > 1 else e) for e in items.elts]
                if values and all(v is not None for v in values):
                    bound[target.id] = values  # type: ignore[assignment]
        saved = dict(self.loop_names)
        self.loop_names.update(bound)
        self.generic_visit(node)
        self.loop_names = saved

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault") and _is_env(func.value) and node.args:
            self._read(node.args[0], node)
        elif isinstance(func, ast.Attribute) and func.attr == "getenv" and node.args:
            self._read(node.args[0], node)
        else:
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in READERS:
                names = node.args if name == "_env_int" else node.args[:1]
                for arg in names:
                    self._read(arg, node, READERS[name])
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript):
        if isinstance(node.ctx, ast.Load) and _is_env(node.value):
            self._read(node.slice, node)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare):
        if len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) and _is_env(node.comparators[0]):
            self._read(node.left, node)
        self.generic_visit(node)


def scan(root: Path = ROOT) -> Scan:
    found = Scan()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            tree = ast.parse(path.read_text(), str(rel))
            _Visitor(module, str(rel), found, tree).visit(tree)
    return found
