"""The layer table in docs/architecture.md against the code: every module is in it, a module imports only
modules of its own row or the rows above, no module imports another's private name, and no import cycles."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gptjax"


def layer_rows() -> list[set[str]]:
    """The table's rows, as module names ("tasks.pretrain", "cpu" for the subpackage)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = re.search(r"```\n(.*?)```", doc, re.S).group(1)
    rows: list[set[str]] = []
    for line in table.splitlines():
        left = re.split(r"\s{3,}", line.strip())[0]
        names = re.findall(r"[a-z_0-9]+/?", left)
        if not line.startswith(" "):
            rows.append(set())
        if names and names[0] == "tasks/":
            rows[-1].add("tasks")
            names = names[1:]
        prefix = "tasks." if "tasks" in rows[-1] else ""
        rows[-1] |= {prefix + n for n in names}
    return rows


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    if parts[0] == "cpu":
        return "cpu"
    return ".".join(p for p in parts if p != "__init__") or "gptjax"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every gptjax import in `path`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gptjax":
            base = node.module.removeprefix("gptjax").lstrip(".")
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                is_module = (PKG / sub.replace(".", "/")).with_suffix(".py").is_file() or (PKG / sub).is_dir()
                out.append((sub if is_module else base, [] if is_module else [a.name]))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("gptjax."), []) for a in node.names if a.name.startswith("gptjax.")]
    return out


def test_every_module_imports_only_its_own_row_or_the_rows_above():
    rows = layer_rows()
    rank = {m: i for i, row in enumerate(rows) for m in row}
    files = [p for p in PKG.rglob("*.py") if p != PKG / "__init__.py"]  # the package's API imports lazily
    missing = sorted({module_name(p) for p in files} - set(rank))
    assert not missing, f"modules missing from docs/architecture.md's table: {missing}"
    upward = []
    for p in files:
        me = module_name(p)
        for target, _ in imports(p):
            target = "cpu" if target.split(".")[0] == "cpu" else target
            if rank.get(target, -1) > rank[me]:
                upward.append(f"{me} -> {target}")
    assert not upward, f"imports of a lower row: {upward}"


def test_no_private_names_across_modules_and_no_import_cycles():
    graph: dict[str, set[str]] = {}
    private = []
    for p in PKG.rglob("*.py"):
        me = ".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
        graph[me] = set()
        for target, names in imports(p):
            private += [f"{me} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__") and target != me]
            if target != me:
                graph[me].add(target)
    assert not private

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        for nxt in graph.get(node, ()):
            if nxt not in done:
                visit(nxt, path + [node])
        done.add(node)

    done: set[str] = set()
    for m in graph:
        visit(m, [])
