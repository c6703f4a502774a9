"""The layering of the packages, read from the source: who may import whom.

Every ``.py`` file of our packages is parsed with ``ast``; every import counts, the lazy ones
inside functions and the ``TYPE_CHECKING`` ones included (relative imports resolved). The rules
(docs/architecture.md):

- ``moe/`` stands on top: no other package imports it;
- ``launch/`` imports none of our packages; ``ops/`` only ``cpu_kernels/``;
- ``experts/`` does not import ``parallel/``; ``kvcache/`` imports neither ``routing/`` nor ``experts/``;
- ``torch.distributed`` is used (imported or reached as an attribute) only in ``parallel/`` and
  ``launch/``;
- the model files ``moe/models/*.py`` hold no ``cpu_kernels`` reference.

tests/, benchmarks/ and examples/ are not packages and are not checked. Each failure names the
offending file:line.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = frozenset({"moe", "routing", "experts", "parallel", "kvcache", "launch", "cpu_kernels", "ops"})
DISTRIBUTED_ALLOWED = frozenset({"parallel", "launch"})


def forbidden_imports(package: str) -> frozenset[str]:
    """Our packages that ``package`` must not import."""
    if package == "moe":
        return frozenset()
    if package == "launch":
        return OURS - {"launch"}
    if package == "ops":
        return OURS - {"ops", "cpu_kernels"}
    extra = {"experts": {"parallel"}, "kvcache": {"routing", "experts"}}.get(package, set())
    return frozenset({"moe"} | extra)


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute and dotted, e.g. "parallel.layers" or "torch.distributed"

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def module_parts(rel_path: str) -> list[str]:
    """``moe/models/decoder.py`` -> ["moe", "models", "decoder"]; a package's ``__init__`` is the package."""
    parts = list(Path(rel_path).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of(tree: ast.AST, rel_path: str) -> list[Import]:
    """Every import in the file, at any depth; ``from torch import distributed`` counts as
    ``torch.distributed``."""
    found = []
    here = module_parts(rel_path)
    is_package = Path(rel_path).name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: up from this module's package
                base = here if is_package else here[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(node.lineno, module))
            found += [Import(node.lineno, f"{module}.{alias.name}") for alias in node.names
                      if module == "torch" and alias.name == "distributed"]
    return found


def distributed_uses(tree: ast.AST, rel_path: str) -> list[int]:
    """Lines that import ``torch.distributed`` or reach it as an attribute of torch (``torch.distributed.x``,
    also through ``import torch as t``)."""
    torch_names = {"torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {alias.asname for alias in node.names if alias.name == "torch" and alias.asname}
    lines = [i.line for i in imports_of(tree, rel_path)
             if i.module == "torch.distributed" or i.module.startswith("torch.distributed.")]
    lines += [node.lineno for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr == "distributed"
              and isinstance(node.value, ast.Name) and node.value.id in torch_names]
    return sorted(set(lines))


def cpu_kernels_references(tree: ast.AST, rel_path: str) -> list[int]:
    """Lines that import ``cpu_kernels`` or name it."""
    lines = [i.line for i in imports_of(tree, rel_path) if i.top == "cpu_kernels"]
    lines += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == "cpu_kernels"]
    return sorted(set(lines))


def package_files() -> dict[str, ast.AST]:
    """``relative path -> parsed module`` for every .py file of our packages."""
    files = {}
    for package in sorted(OURS):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            files[rel] = ast.parse(path.read_text(), filename=rel)
    return files


def import_violations(files: dict[str, ast.AST]) -> list[str]:
    out = []
    for rel, tree in files.items():
        package = rel.split("/")[0]
        banned = forbidden_imports(package)
        out += [f"{rel}:{i.line}: {package}/ imports {i.module} ({i.top}/ is off limits to {package}/)"
                for i in imports_of(tree, rel) if i.top in banned]
    return out


def distributed_violations(files: dict[str, ast.AST]) -> list[str]:
    return [f"{rel}:{line}: torch.distributed outside parallel/ and launch/ (use a parallel/ collective)"
            for rel, tree in files.items() if rel.split("/")[0] not in DISTRIBUTED_ALLOWED
            for line in distributed_uses(tree, rel)]


def model_file_violations(files: dict[str, ast.AST]) -> list[str]:
    return [f"{rel}:{line}: a model file references cpu_kernels (kernel choices belong below the models)"
            for rel, tree in files.items() if Path(rel).parent.as_posix() == "moe/models"
            for line in cpu_kernels_references(tree, rel)]


# ---- the repository --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files() -> dict[str, ast.AST]:
    found = package_files()
    assert "moe/engine.py" in found and "parallel/state.py" in found  # the walk found the tree
    return found


def test_packages_import_only_what_the_layering_allows(files):
    bad = import_violations(files)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_torch_distributed_only_in_parallel_and_launch(files):
    bad = distributed_violations(files)
    assert not bad, "\n".join(bad)


def test_model_files_hold_no_kernel_calls(files):
    bad = model_file_violations(files)
    assert not bad, "\n".join(bad)


# ---- the checks themselves, on small synthetic files -----------------------------------------

def _parse(files: dict[str, str]) -> dict[str, ast.AST]:
    return {rel: ast.parse(src) for rel, src in files.items()}


def test_the_import_check_sees_lazy_relative_and_type_only_imports():
    files = _parse({
        "experts/a.py": "import torch\n\ndef f():\n    from parallel.layers import linear\n",
        "experts/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import parallel\n",
        "kvcache/c.py": "from routing import route\nfrom .block_manager import BlockManager\n",
        "launch/d.py": "import os\nfrom cpu_kernels import build\n",
        "ops/e.py": "import cpu_kernels\nfrom experts import x\n",
        "routing/f.py": "class R:\n    def g(self):\n        import moe.config\n",
        "moe/models/g.py": "from .layers import RMSNorm\nfrom ..config import EngineConfig\nfrom . import mla\n",
        "moe/h.py": "import parallel, experts, launch, routing\n",
        "parallel/i.py": "from experts import GroupedExperts\n",
    })
    assert import_violations(files) == [
        "experts/a.py:4: experts/ imports parallel.layers (parallel/ is off limits to experts/)",
        "experts/b.py:3: experts/ imports parallel (parallel/ is off limits to experts/)",
        "kvcache/c.py:1: kvcache/ imports routing (routing/ is off limits to kvcache/)",
        "launch/d.py:2: launch/ imports cpu_kernels (cpu_kernels/ is off limits to launch/)",
        "ops/e.py:2: ops/ imports experts (experts/ is off limits to ops/)",
        "routing/f.py:3: routing/ imports moe.config (moe/ is off limits to routing/)",
    ]
    # relative imports resolve inside their package (a module, and a package's __init__)
    assert [i.module for i in imports_of(files["moe/models/g.py"], "moe/models/g.py")] == [
        "moe.models.layers", "moe.config", "moe.models"]
    init = ast.parse("from .state import x\nfrom . import layers\n")
    assert [i.module for i in imports_of(init, "parallel/__init__.py")] == ["parallel.state", "parallel"]


def test_the_distributed_check_sees_imports_and_attribute_access():
    files = _parse({
        "moe/a.py": "import torch.distributed as dist\n",
        "moe/b.py": "import torch\n\ndef f(x):\n    return torch.distributed.all_reduce(x)\n",
        "moe/c.py": "from torch import distributed\n",
        "moe/d.py": "import torch as t\nt.distributed.barrier()\n",
        "moe/e.py": "from torch.distributed import ProcessGroup\n",
        "moe/f.py": "import torch\ncmd = ['python', '-m', 'torch.distributed.run']\nx = torch.nn\n",
        "parallel/g.py": "import torch.distributed as dist\ndist.all_reduce(x)\n",
        "launch/h.py": "import torch\ntorch.distributed.init_process_group('gloo')\n",
    })
    assert distributed_violations(files) == [
        f"moe/{f}.py:{line}: torch.distributed outside parallel/ and launch/ (use a parallel/ collective)"
        for f, line in (("a", 1), ("b", 4), ("c", 1), ("d", 2), ("e", 1))]


def test_the_model_file_check_sees_imports_and_names():
    files = _parse({
        "moe/models/a.py": "def f(x):\n    import cpu_kernels\n    return cpu_kernels.rms_norm(x)\n",
        "moe/models/b.py": "from cpu_kernels.build import load\n",
        "moe/models/c.py": "# cpu_kernels is not used here\nimport ops\n",
        "moe/model_runner.py": "import cpu_kernels\n",  # not a model file
        "experts/d.py": "import cpu_kernels\n",
    })
    assert model_file_violations(files) == [
        "moe/models/a.py:2: a model file references cpu_kernels (kernel choices belong below the models)",
        "moe/models/a.py:3: a model file references cpu_kernels (kernel choices belong below the models)",
        "moe/models/b.py:1: a model file references cpu_kernels (kernel choices belong below the models)",
    ]
