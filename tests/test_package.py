"""The public surface, and a built wheel that carries `moa_stream.adapters`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import moa_stream

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_sorted_and_every_name_exists() -> None:
    assert moa_stream.__all__ == sorted(moa_stream.__all__)
    for name in moa_stream.__all__:
        assert hasattr(moa_stream, name), name


def test_adapters_import_from_the_source_tree() -> None:
    import moa_stream.adapters

    assert Path(moa_stream.adapters.__file__).parent == ROOT / "adapters"


def test_built_wheel_carries_adapters_under_moa_stream(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("moa_stream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moa_stream/adapters/__init__.py" in names
    assert "moa_stream/prices.json" in names
    assert "moa_stream/py.typed" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S skips .pth files, so the editable install's import hook cannot point back at the source tree;
    # the dependencies come from site-packages appended after the unpacked wheel.
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    probe = (
        "import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]);"
        "import moa_stream.adapters as a, moa_stream as m;"
        "print(a.__file__); print(m.PriceTable.builtin().lookup('gpt-4.1') is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(site), site_packages],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.split()
    assert out[0].startswith(str(site))
    assert out[1] == "True"


def test_readme_quickstart_runs_against_the_simulator(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "openai.AsyncOpenAI()" in code
    # The simulator answers any model name; only the client and the trace directory change.
    code = code.replace("openai.AsyncOpenAI()", "sim_client()").replace('"traces"', repr(str(tmp_path)))
    code = "from moa_stream._sim_transport import sim_client\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "TurnEnd(" in result.stdout  # the print sink saw the turn end
    assert list(tmp_path.glob("*.jsonl"))
