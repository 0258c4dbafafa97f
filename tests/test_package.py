"""The public surface, and a built wheel that carries `moa_stream.adapters` and `moa_stream.benchmarks`."""

from __future__ import annotations
import __future__

import ast
import importlib.metadata
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import moa_stream

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_sorted_and_every_name_exists() -> None:
    assert moa_stream.__all__ == sorted(moa_stream.__all__)
    for name in moa_stream.__all__:
        assert hasattr(moa_stream, name), name


def test_adapters_import_from_the_source_tree() -> None:
    import moa_stream.adapters

    assert Path(moa_stream.adapters.__file__).parent == ROOT / "adapters"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [built] = dist.glob("moa_stream-*.whl")
    return built


def _from_wheel(wheel: Path, tmp_path: Path, probe: str) -> str:
    """Run `probe` with the unpacked wheel first on sys.path, from a directory outside the checkout.

    -S skips .pth files, so the editable install's import hook cannot point back at the source tree;
    the dependencies come from site-packages appended after the unpacked wheel."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    prelude = "import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]);"
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + probe, str(site), site_packages],
        check=True,
        capture_output=True,
        text=True,
        cwd=work,
        timeout=300,
    ).stdout


def test_built_wheel_carries_adapters_under_moa_stream(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "moa_stream/adapters/__init__.py" in names
    assert "moa_stream/prices.json" in names
    assert "moa_stream/py.typed" in names
    probe = (
        "import moa_stream.adapters as a, moa_stream as m;"
        "print(a.__file__); print(m.PriceTable.builtin().lookup('gpt-4.1') is not None)"
    )
    out = _from_wheel(wheel, tmp_path, probe).split()
    assert out[0].startswith(str(tmp_path / "site"))
    assert out[1] == "True"


def test_built_wheel_carries_the_benchmarks_and_bench_runs_from_it(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name.rpartition("/")[2] for name in names if name.startswith("moa_stream/benchmarks/")}
    assert shipped == {path.name for path in (ROOT / "benchmarks").glob("*.py")}
    # Every module imports from the wheel alone (no `tests`, no checkout), then the suite runs and
    # writes to ./moa-stream-bench of the working directory.
    probe = (
        "import importlib, pkgutil, moa_stream.benchmarks as b;"
        "found = [m.name for m in pkgutil.iter_modules(b.__path__) if m.name != '__main__'];"
        "print(*[importlib.import_module(f'moa_stream.benchmarks.{n}').__file__ for n in found]);"
        "from moa_stream._cli import main;"
        "sys.exit(main(['bench', '--quick', '--sections', 'fanout']))"
    )
    out = _from_wheel(wheel, tmp_path, probe)
    files = out.splitlines()[0].split()
    assert len(files) == len(shipped) - 2  # all but __init__ and __main__
    assert all(file.startswith(str(tmp_path / "site" / "moa_stream" / "benchmarks")) for file in files)
    document = json.loads((tmp_path / "work" / "moa-stream-bench" / "fanout.json").read_text())
    assert document["command"].endswith("bench --quick --sections fanout")
    assert document["quick"] is True


def test_benchmarks_import_only_what_an_installed_package_has() -> None:
    # Absolute imports of the checkout's top-level packages would work from the source tree alone.
    for path in (ROOT / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                assert name.partition(".")[0] not in ("tests", "tests_local", "benchmarks", "adapters"), (path, name)


PACKAGE = ROOT / "moa_stream"


def test_all_lists_every_public_name_and_nothing_else() -> None:
    import moa_stream.testing

    for module in (moa_stream, moa_stream.testing):
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType | __future__._Feature)
        }
        lazy = {"OTelSink"} if module is moa_stream else set()  # imported on first use (the otel extra)
        assert public | lazy == set(module.__all__) - {"__version__"}, module.__name__
        assert module.__all__ == sorted(module.__all__)


def test_exported_names_show_the_public_module() -> None:
    import moa_stream.testing

    assert moa_stream.wrap.__module__ == "moa_stream"
    assert moa_stream.TurnEnd.__module__ == "moa_stream"
    assert repr(moa_stream.ConfigError("x")) == "ConfigError('x')"
    assert moa_stream.OTelSink.__module__ == "moa_stream"
    assert moa_stream.testing.Simulator.__module__ == "moa_stream.testing"
    for module in (moa_stream, moa_stream.testing):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type | types.FunctionType):
                assert value.__module__ == module.__name__, name


def test_version_is_the_installed_distributions() -> None:
    assert moa_stream.__version__ == importlib.metadata.version("moa-stream")


def _internal_imports(path: Path) -> set[str]:
    """Every moa_stream module `path` imports, at module level or inside a function, as dotted names."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.name == "__init__.py":
        module = package
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            # `from . import x` and `from .pkg import mod` may name modules too
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moa_stream"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("moa_stream"))
    return {name for name in found if name != module}


def test_no_import_cycle_inside_the_package() -> None:
    paths = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")
    }
    # Importing any module imports the package first; that is Python's doing, not an edge of ours.
    graph = {
        name: {t for t in _internal_imports(path) if t in paths and t != "moa_stream"} for name, path in paths.items()
    }
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(name) :], name])
        visiting.append(name)
        for target in sorted(graph[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert len(done) > 40  # the walk saw the package


def test_no_module_is_over_450_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: size for name, size in sizes.items() if size > 450} == {}
