"""Imports go one way (capture → passes → ops → runtime → codegen/lowering): codegen only renders
source text, the runtime launches it, the operators call the runtime. Checked on the import
statements themselves, so a back edge fails here even when it happens to work at run time."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "fxfuse"

# For each layer, the fxfuse modules it must never import (directly or lazily).
FORBIDDEN = {
    "codegen": ("fxfuse.runtime", "fxfuse.ops", "fxfuse.passes", "fxfuse.capture", "fxfuse.api"),
    "lowering": ("fxfuse.runtime", "fxfuse.ops", "fxfuse.passes", "fxfuse.codegen"),
    "runtime": ("fxfuse.ops", "fxfuse.passes", "fxfuse.capture", "fxfuse.api", "fxfuse.backend"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    bad = [(p.name, name) for p in sorted((PACKAGE / layer).glob("*.py")) for name in sorted(_imports(p))
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])]
    assert not bad, f"{layer} imports what sits above it: {bad}"


def test_codegen_renders_text_only():
    """No module of codegen imports torch, triton's runtime or the kernel cache: it returns text."""
    for p in sorted((PACKAGE / "codegen").glob("*.py")):
        names = _imports(p)
        assert not {n for n in names if n == "torch" or n.startswith("torch.") or n == "triton"}, p.name


def test_operators_launch_through_the_runtime():
    for p in sorted((PACKAGE / "ops").glob("*.py")):
        assert not any(n.startswith("fxfuse.codegen") for n in _imports(p)), f"ops/{p.name} imports codegen"
