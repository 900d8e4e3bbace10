"""How dlngraph installs: one package tree in every mode, and an environment that is the lock.

`dlngraph/compiler` and `dlngraph/runtime` are symlinks to the top-level
folders. The checkout imports with no install at all, a wheel carries the
whole tree, and every dependency installed here is the version
`constraints.txt` pins (`make lock` writes it).
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
EXTRAS = ("test", "server", "docs", "mlflow")  # what `make test` installs
PROBE = "import dlngraph, dlngraph.compiler.pipeline, dlngraph.runtime.backends.registry as r; print(r.__file__)"


def _without_site(*path: Path, cwd: Path) -> str:
    """Run PROBE with only `path` and the dependencies: no .pth file, so no editable-install hook."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), *site.getsitepackages()])}
    done = subprocess.run([sys.executable, "-S", "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_checkout_imports_without_an_install(tmp_path: Path) -> None:
    where = _without_site(ROOT, cwd=tmp_path)
    assert where == str(ROOT / "dlngraph" / "runtime" / "backends" / "registry.py")


def test_no_module_imports_the_top_level_folders_by_name() -> None:
    """`import compiler` works only in a checkout: an installed dlngraph has no such package."""
    top_level = re.compile(r"^\s*(from|import)\s+(compiler|runtime)\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("dlngraph", "compiler", "runtime", "tests", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if top_level.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_a_wheel_holds_the_compiler_and_the_runtime(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the checkout would write build/ there
    for name in ("dlngraph", "compiler", "runtime"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("dlngraph-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("compiler", "runtime"):
        modules = {f"dlngraph/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / folder).rglob("*.py")}
        assert modules and modules <= names, sorted(modules - names)
    assert not any(n.startswith(("compiler/", "runtime/")) for n in names)  # no top-level packages
    site_dir = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site_dir), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    assert _without_site(site_dir, cwd=tmp_path).startswith(str(site_dir))


def _pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_locked_and_installed_at_its_pin() -> None:
    """Walk dlngraph's requirements (with the extras `make test` installs) through the installed metadata."""
    pins = _pins()
    todo: list[tuple[str, frozenset[str]]] = [("dlngraph", frozenset(EXTRAS))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            key = canonicalize_name(req.name)
            assert key in pins, f"{req.name} (needed by {name}) is not in constraints.txt: run `make lock`"
            try:
                installed = Version(metadata.version(req.name))
            except metadata.PackageNotFoundError:  # an extra this environment left out
                continue
            assert installed == pins[key], f"{req.name} {installed} is installed, constraints.txt pins {pins[key]}"
            item = (req.name, frozenset(req.extras))
            if item not in seen:
                seen.add(item)
                todo.append(item)
    assert len(seen) > 50  # the walk reached the whole tree, not just the direct dependencies
