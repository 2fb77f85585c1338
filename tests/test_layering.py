"""The import graph keeps its layers: core < runtimes < exporters < serving < benchmarks < CLI.

The folders ``runtimes/``, ``exporters/``, ``benchmarks/`` (and ``serving/``) are installed as
``lp_deploy.runtimes`` etc. (``[tool.setuptools.package-dir]`` in pyproject.toml); this test
reads that mapping, parses every module's imports (function-level ones included) and checks
each against the rules below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lp_deploy"
#: layer of each top-level part of the package; a module may import only its layer or below
LAYERS = {"core": 0, "runtimes": 1, "exporters": 2, "serving": 3, "benchmarks": 4, "cli": 5}
#: the command line sits above everything
TOP = {f"{PACKAGE}.cli", f"{PACKAGE}.__main__"}
#: adapters stay a small interface: they may use only these core modules
ADAPTER_DEPS = {f"{PACKAGE}.adapters", f"{PACKAGE}.modules", f"{PACKAGE}.errors"}


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, from pyproject.toml's setuptools mapping."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every module of the installed package."""
    for package, folder in package_dirs().items():
        for file in sorted(folder.rglob("*.py")):
            rel = file.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == PACKAGE and parts and parts[0] in package_dirs_short():
                continue  # a mapped folder of the same name inside lp_deploy/ (none today)
            yield name, file


def package_dirs_short() -> set[str]:
    return {n.split(".", 1)[1] for n in package_dirs() if "." in n}


def imports(name: str, file: Path, known: set[str]) -> set[str]:
    """Every ``lp_deploy`` module ``file`` imports (relative imports resolved; ``from M
    import N`` counts as importing ``M.N`` when that is a module, else ``M``)."""
    tree = ast.parse(file.read_text(), str(file))
    is_package = file.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                target = ".".join([*stem, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs or {target}
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def layer(module: str) -> int:
    """The layer of a dotted ``lp_deploy`` module name."""
    if module in TOP:
        return LAYERS["cli"]
    parts = module.split(".")
    return LAYERS.get(parts[1], LAYERS["core"]) if len(parts) > 1 else LAYERS["core"]


def violations() -> list[str]:
    """Every import that breaks a rule, as 'importer -> imported (why)'."""
    found = []
    known = {name for name, _ in modules()}
    for name, file in modules():
        for target in sorted(imports(name, file, known)):
            if target not in known:
                found.append(f"{name} -> {target} (no such module)")
            elif layer(target) > layer(name):
                found.append(f"{name} -> {target} (layer {layer(target)} above {layer(name)})")
            elif name.startswith(f"{PACKAGE}.adapters") and not any(
                target == d or target.startswith(d + ".") for d in ADAPTER_DEPS
            ):
                found.append(f"{name} -> {target} (adapters use only {sorted(ADAPTER_DEPS)})")
    return found


def test_every_mapped_folder_is_found() -> None:
    names = {name for name, _ in modules()}
    for package in package_dirs():
        assert package in names, f"{package} has no __init__.py"
    assert f"{PACKAGE}.runtimes.base" in names and f"{PACKAGE}.exporters.onnx" in names


def test_mapped_folders_say_their_import_path() -> None:
    """Each mapped folder's ``__init__`` docstring names the import path it is installed as."""
    for package, folder in package_dirs().items():
        if package == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert f"installed as ``{package}``" in doc, f"{folder}/__init__.py: {doc[:80]!r}"


def test_the_layers_hold() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("module", "source", "why"),
    [
        ("lp_deploy.pipeline", "from lp_deploy.benchmarks import qa", "layer 4 above 0"),
        ("lp_deploy.fold", "import lp_deploy.runtimes.base", "layer 1 above 0"),
        ("lp_deploy.runtimes.base", "from ..exporters import onnx", "layer 2 above 1"),
        ("lp_deploy.adapters.llama", "from lp_deploy.fit import fit_patch", "adapters use only"),
    ],
)
def test_a_broken_rule_is_reported(
    module: str, source: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checker itself fails on a planted violation (it is not vacuous)."""
    real = dict(modules())
    planted = tmp_path / real[module].name
    planted.write_text(real[module].read_text() + f"\n{source}\n")

    def with_plant() -> Iterator[tuple[str, Path]]:
        for name, file in real.items():
            yield name, planted if name == module else file

    monkeypatch.setattr(__import__(__name__), "modules", with_plant)
    found = violations()
    assert len(found) == 1 and found[0].startswith(f"{module} ->") and why in found[0], found
