"""The package's shape: no import circle between vitq's modules (deferred imports inside functions count)."""
import ast
from pathlib import Path

import vitq

PKG = Path(vitq.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                hits = [n for n in names if n in modules] or ([target] if target in modules else [])
                graph[mod].update(h for h in hits if h != mod)
    return graph


def test_no_import_circles():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "vitq.methods.capture" in graph and graph["vitq.cli"]  # the graph was really built


def test_the_command_line_parses_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, vitq.cli; vitq.cli.build_parser().parse_args(['quantize', 'deit_tiny', '--calib', 'a', "
            "'--eval', 'b', '--out', 'c']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `vitq --help` answers without torch's seconds of start-up


def import_table() -> str:
    """Which vitq module imports which (deferred imports included; a package stands for its ``__init__``),
    as the Markdown table docs/design.md holds."""
    graph = _imports()
    short = lambda m: m.removeprefix("vitq.") or "vitq"  # noqa: E731
    rows = ["| module | imports |", "|---|---|"]
    for m in sorted(graph):
        rows.append(f"| `{short(m)}` | {', '.join(sorted(short(d) for d in graph[m])) or '-'} |")
    return "\n".join(rows)


def test_design_md_shows_the_imports_the_code_has():
    design = (PKG.parents[1] / "docs" / "design.md").read_text()
    assert import_table() in design, "docs/design.md's import table is stale: python tests/test_structure.py prints it"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (PKG.parents[1] / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:15])
    assert "make demo" in first_screen and "make test" in first_screen


if __name__ == "__main__":
    print(import_table())
