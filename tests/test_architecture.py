"""The house rules of docs/architecture.md, checked from the source: the import graph is read from the files
(every `import` and `from ... import`, also inside functions), never from a list kept by hand.

- no import cycle anywhere in the package;
- a module imports only modules of its own layer or of lower layers (LAYERS, bottom first);
- the core imports no concrete model library (perturbations know `torch.nn.Module`, never diffusers);
- experiments never import the commands (cli sits on top of everything).

The checker is tested too: on a small package made in a temporary folder, it must report a cycle and a
forbidden import, so a test that passes here means the rules hold, not that the checker saw nothing.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "autoguidance"

#: layers, bottom first: top-level parts of the package (a module `autoguidance.X...` belongs to part X).
LAYERS = [
    ("base", {"_version", "rng", "schedules", "runs"}),
    ("core", {"denoiser", "perturb", "rules", "guidance", "sampling", "guides"}),
    ("models", {"nets", "toy", "data"}),
    ("library", {"checkpoint", "adapters", "edm2", "methods", "metrics", "train", "guidemaker"}),
    ("top", {"experiments", "cli"}),
]
#: the rooms of the diffusers adapter (`autoguidance.adapters.diffusers.X`) and the package modules each may import
#: (prefixes); a model family (`families.<name>`) knows perturb and other families only, so a new family is one file.
DIFFUSERS_ROOMS = {
    "schedules": (),
    "families": ("autoguidance.perturb", "autoguidance.adapters.diffusers.families"),
    "denoiser": ("autoguidance.denoiser", "autoguidance.adapters.diffusers.schedules",
                 "autoguidance.adapters.diffusers.families"),
    "model_call": ("autoguidance.denoiser", "autoguidance.guidance", "autoguidance.rng", "autoguidance.rules",
                   "autoguidance.schedules", "autoguidance.adapters.diffusers.schedules",
                   "autoguidance.adapters.diffusers.families"),
    "insitu_unet": ("autoguidance.guidance", "autoguidance.perturb", "autoguidance.rng", "autoguidance.schedules",
                    "autoguidance.adapters.diffusers.model_call"),
}
#: the package's face (`autoguidance/__init__.py`) may import every layer below the top.
FACADE_LAYER = 3.5
CORE_LAYER = 1
#: third-party imports the core may use; anything else (diffusers, transformers, k_diffusion, ...) is an adapter's.
CORE_THIRD_PARTY = {"torch", "numpy", "tqdm"}
#: (importer part, imported part) pairs that are forbidden although the layers would allow them.
FORBIDDEN_PAIRS = {("experiments", "cli")}


def module_files(package_dir: Path) -> dict[str, Path]:
    """`{'pkg.sub.mod': path}` for every .py file of the package (an `__init__.py` names its package)."""
    root = package_dir.name
    out = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = list(f.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([root, *parts])] = f
    return out


def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """`(internal, external)`: for each module, the package modules it imports, and the top-level names of the
    other packages it imports."""
    files = module_files(package_dir)
    root = package_dir.name
    internal: dict[str, set[str]] = {m: set() for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]     # the package a relative import starts from
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
                names: list[list[str]] = [[] for _ in targets]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - (node.level - 1)]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module]
                names = [[a.name for a in node.names]]
            else:
                continue
            for target, imported in zip(targets, names):
                if target.split(".")[0] != root:
                    external[mod].add(target.split(".")[0])
                    continue
                subs = [f"{target}.{n}" for n in imported if f"{target}.{n}" in files]
                if subs:                                  # `from pkg import submodule`
                    internal[mod].update(subs)
                if not subs or len(subs) < len(imported):  # names defined in `target` itself
                    while target not in files and "." in target:
                        target = target.rsplit(".", 1)[0]
                    internal[mod].add(target)
        internal[mod].discard(mod)
    return internal, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str, layers=LAYERS) -> float:
    p = part(module)
    if p == "":
        return FACADE_LAYER
    for i, (_, parts) in enumerate(layers):
        if p in parts:
            return i
    raise KeyError(f"{module}: part {p!r} is in no layer; add it to LAYERS in tests/test_architecture.py and to "
                   "docs/architecture.md")


def violations(internal: dict[str, set[str]], external: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Every import that breaks a rule, as 'importer -> imported: why'."""
    bad = []
    for mod, targets in sorted(internal.items()):
        mine = layer_of(mod, layers)
        for t in sorted(targets):
            theirs = layer_of(t, layers)
            if theirs == FACADE_LAYER and mine != FACADE_LAYER:
                bad.append(f"{mod} -> {t}: only users import the package's face; import the module itself")
            elif theirs > mine:
                bad.append(f"{mod} -> {t}: layer {layers[int(mine)][0] if mine < len(layers) else 'facade'} "
                           f"imports the higher layer {layers[int(theirs)][0]}")
            elif (part(mod), part(t)) in FORBIDDEN_PAIRS:
                bad.append(f"{mod} -> {t}: {part(mod)} must not import {part(t)}")
        if mine == CORE_LAYER:
            for ext in sorted(external[mod]):
                if ext not in CORE_THIRD_PARTY and ext not in sys.stdlib_module_names and ext != "__future__":
                    bad.append(f"{mod} imports {ext}: the core knows torch, never a model library; put it in an "
                               "adapter that registers its rules with perturb")
    return bad


# -- the package --------------------------------------------------------------------------------------------------

def test_package_has_no_import_cycle():
    internal, _ = import_graph(PACKAGE_DIR)
    assert len(internal) > 50          # the whole package was read
    assert cycles(internal) == []


def test_package_keeps_its_layers():
    internal, external = import_graph(PACKAGE_DIR)
    assert violations(internal, external) == []


def test_every_part_of_the_package_has_a_layer():
    internal, _ = import_graph(PACKAGE_DIR)
    for mod in internal:
        layer_of(mod)   # raises naming the part that has no layer


def test_graph_sees_imports_inside_functions():
    internal, _ = import_graph(PACKAGE_DIR)
    # autoguidance.methods loads checkpoints lazily, inside a function
    assert "autoguidance.checkpoint" in internal["autoguidance.methods"]
    # the adapters' rules reach perturb through a registry the adapter fills, not through an import by perturb
    assert "autoguidance.perturb" in internal["autoguidance.adapters"]
    assert not any(t.startswith("autoguidance.adapters") for m, ts in internal.items() if part(m) == "perturb"
                   for t in ts)


def test_diffusers_adapter_rooms_keep_their_jobs():
    internal, _ = import_graph(PACKAGE_DIR)
    pkg = "autoguidance.adapters.diffusers"
    rooms = sorted(m for m in internal if m.startswith(pkg + "."))
    assert {m[len(pkg) + 1:].split(".")[0] for m in rooms} == set(DIFFUSERS_ROOMS)   # every room has a rule
    bad = [f"{m} -> {t}" for m in rooms for t in sorted(internal[m])
           if not t.startswith(DIFFUSERS_ROOMS[m[len(pkg) + 1:].split(".")[0]])]
    assert bad == []
    assert len([m for m in rooms if m.startswith(pkg + ".families.")]) >= 4        # attention, unet, sd3, flux


# -- the checker itself ------------------------------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


@pytest.fixture
def fake(tmp_path):
    """A small package `pkg` laid out like ours: base (rng), core (perturb), library (adapters), top (cli)."""
    return _write(tmp_path / "pkg", {
        "__init__.py": "from . import perturb\n",
        "rng.py": "import math\n",
        "perturb/__init__.py": "from .base import Perturbation\n",
        "perturb/base.py": "import torch\nfrom ..rng import math\nclass Perturbation: pass\n",
        "adapters/__init__.py": "from ..perturb import Perturbation\n",
        "cli/__init__.py": "def main():\n    from ..adapters import x\n",
    })


def test_checker_passes_a_clean_package(fake):
    internal, external = import_graph(fake)
    assert internal["pkg.perturb.base"] == {"pkg.rng"}
    assert internal["pkg.cli"] == {"pkg.adapters"}
    assert cycles(internal) == []
    assert violations(internal, external) == []


def test_checker_finds_a_cycle(fake):
    # the core asks an adapter for its rules: perturb -> adapters -> perturb
    (fake / "perturb/base.py").write_text("def rules():\n    from ..adapters import register\n")
    internal, external = import_graph(fake)
    assert cycles(internal) == [["pkg.adapters", "pkg.perturb", "pkg.perturb.base"]]
    assert any("pkg.perturb.base -> pkg.adapters" in v and "higher layer" in v for v in violations(internal, external))


def test_checker_finds_a_forbidden_import(fake):
    (fake / "schedules.py").write_text("from .cli import main\n")                 # base imports the top
    (fake / "perturb/extra.py").write_text("import diffusers\n")                    # core imports a model library
    (fake / "experiments").mkdir()
    (fake / "experiments/__init__.py").write_text("from ..cli import main\n")       # experiments import the cli
    internal, external = import_graph(fake)
    found = violations(internal, external)
    assert any(v.startswith("pkg.schedules -> pkg.cli") for v in found)
    assert any(v.startswith("pkg.perturb.extra imports diffusers") for v in found)
    assert any(v.startswith("pkg.experiments -> pkg.cli") for v in found)
    assert cycles(internal) == []     # none of these is a cycle: the layer rule alone catches them


def test_checker_refuses_a_part_without_layer(fake):
    (fake / "newpart.py").write_text("x = 1\n")
    internal, _ = import_graph(fake)
    with pytest.raises(KeyError, match="newpart"):
        layer_of("pkg.newpart")
