"""The request path reads straight: no circles of imports, an edge that knows nothing of chat, one
error catalogue. Read from the source with `ast` (nothing is imported or run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "pwachat"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules that `tree` imports, at any depth (lazy imports inside functions too);
    `from pwachat import x` names the module `pwachat.x` when there is one."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pwachat"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pwachat")}
    return out


def test_no_module_imports_itself_back_through_others() -> None:
    trees = _modules()
    names = set(trees)
    graph = {name: _imports(tree, names) - {name, "pwachat"} for name, tree in trees.items()}
    circles = []

    def visit(name: str, path: list[str]) -> None:
        for dep in graph.get(name, ()):
            if dep in path:
                circles.append([*path[path.index(dep) :], dep])
            elif len(path) < 12:
                visit(dep, [*path, dep])

    for name in graph:
        visit(name, [name])
    assert not circles, circles[:5]


def test_the_edge_knows_nothing_of_the_routes_behind_it() -> None:
    trees = _modules()
    for edge in ("pwachat.edge", "pwachat.forwarded"):
        imported = _imports(trees[edge], set(trees))
        assert not {
            m for m in imported if m.startswith(("pwachat.routes", "pwachat.relay", "pwachat.providers"))
        }


def test_every_contract_error_is_defined_in_the_catalogue() -> None:
    trees = _modules()
    elsewhere = []
    for name, tree in trees.items():
        if name == "pwachat.errors":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & {"ApiError", "ProviderError", "InvalidRequest", "UpstreamError"}:
                    elsewhere.append(f"{name}.{node.name}")
    assert not elsewhere, elsewhere
    catalogue = trees["pwachat.errors"]
    codes = [
        n.value.elts[1].value
        for n in ast.walk(catalogue)
        if isinstance(n, ast.Assign)
        and isinstance(n.value, ast.Tuple)
        and len(n.value.elts) >= 2
        and isinstance(n.value.elts[1], ast.Constant)
    ]
    # Every code of the contract's error table is in it, each once.
    for code in (
        "invalid_json invalid_request unknown_provider unknown_model unauthorized https_required not_found "
        "method_not_allowed payload_too_large unsupported_media_type rate_limited upstream_error "
        "provider_not_configured upstream_rate_limited upstream_timeout stream_not_found request_timeout "
        "budget_exceeded shutting_down"
    ).split():
        assert codes.count(code) == 1, (code, codes)


def test_no_two_files_share_a_vague_name() -> None:
    stems = [p.stem for p in PACKAGE.rglob("*.py")] + [
        p.stem for p in (PACKAGE.parent.parent / "tests").glob("*.py")
    ]
    assert not [s for s in stems if s in ("wire", "_wire", "test_wire", "security")]
