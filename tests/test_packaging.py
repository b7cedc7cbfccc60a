"""streamrec installs as one package and offers a curated public surface.

The wheel built from the repository holds exactly one top-level package, ``streamrec`` (the
design card's folders become its subpackages); installed into a fresh virtual environment it
imports and runs from there, without the source tree. ``streamrec.__all__`` lists exactly the
public names of the package (as httpx checks its exported members).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import types
import zipfile
from pathlib import Path

import pytest

import streamrec

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "infra", "streams", "serving")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps .`` on a copy of the checkout (an in-tree build leaves build/ and
    egg-info folders behind)."""
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source") / "streamrec"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".hypothesis", "eval-out", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ".", "-w", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=source)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("streamrec-*.whl")
    return found


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"streamrec", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for layer in LAYERS:  # every layer is a subpackage, with all its modules
        shipped = {n for n in names if n.startswith(f"streamrec/{layer}/") and n.endswith(".py")}
        expected = {f"streamrec/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / layer).rglob("*.py")
                    if "__pycache__" not in p.parts}
        assert shipped == expected, layer
    assert {"streamrec/infra/lua/apply_user_events.lua", "streamrec/infra/lua/apply_trending.lua",
            "streamrec/infra/lua/apply_item_facts.lua", "streamrec/infra/lua/apply_item_batch.lua",
            "streamrec/infra/lua/log_space.lua",
            "streamrec/py.typed"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("dist-info/entry_points.txt"))).decode()
    assert "streamrec = streamrec.serving.cli:main" in entry_points


def test_the_wheel_imports_in_a_fresh_virtual_environment(wheel: Path, tmp_path: Path) -> None:
    """A new venv with only the wheel installed. Its dependencies (torch, faiss, ... take
    minutes to install) are borrowed from this environment through a ``.pth`` line, which
    adds their folder to ``sys.path`` without running this environment's ``.pth`` hooks, so
    the editable install of the source tree is not visible there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import importlib.util, json, streamrec\n"
        "streamrec.Publisher; streamrec.Reader; streamrec.Settings\n"
        "import streamrec.serving.cli, streamrec.infra.state\n"
        "print(json.dumps({'file': streamrec.__file__, 'version': streamrec.__version__,\n"
        "  'bare': [n for n in ('models', 'infra', 'streams', 'serving') if importlib.util.find_spec(n)]}))\n"
    )
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    import json
    got = json.loads(run.stdout)
    assert Path(got["file"]).is_relative_to(site), got  # the installed copy, not the source tree
    assert got["version"] == streamrec.__version__
    assert got["bare"] == []  # no generic top-level names were installed
    cli = subprocess.run([str(venv / "bin" / "streamrec"), "schema"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert cli.returncode == 0 and '"click"' in cli.stdout, cli.stderr[-2000:]
    module = subprocess.run([str(python), "-m", "streamrec", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert module.returncode == 0 and "replay" in module.stdout


def test_what_the_dockerfile_copies_builds_the_package(tmp_path: Path) -> None:
    """Docker does not run here: build from exactly the paths the Dockerfile's COPY lines
    name, and check the wheel holds every module (a folder missing from the Dockerfile would
    leave the image without it)."""
    copies = [line.split()[1:-1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")]
    context = tmp_path / "context"
    context.mkdir()
    for sources_ in copies:
        for name in sources_:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, context / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ".", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=context)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = tmp_path.glob("streamrec-*.whl")
    shipped = {n for n in zipfile.ZipFile(found).namelist() if n.endswith(".py")}
    expected = {f"streamrec/{p.relative_to(ROOT).as_posix()}" for layer in LAYERS for p in (ROOT / layer).rglob("*.py")
                if "__pycache__" not in p.parts} | {"streamrec/__init__.py", "streamrec/__main__.py"}
    assert shipped == expected


def test_all_lists_exactly_the_public_members() -> None:
    public = sorted(n for n in dir(streamrec) if (not n.startswith("_") or n == "__version__")
                    and not isinstance(getattr(streamrec, n), types.ModuleType))  # the layers
    assert sorted(streamrec.__all__) == public
    for name in streamrec.__all__:
        value = getattr(streamrec, name)
        if isinstance(value, type):
            assert value.__module__.startswith("streamrec."), name


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(streamrec, n) for n in streamrec.__all__
              if isinstance(getattr(streamrec, n), type) and issubclass(getattr(streamrec, n), Exception)]
    assert len(errors) >= 8
    assert all(issubclass(e, streamrec.StreamrecError) for e in errors)
    assert issubclass(streamrec.KafkaServiceError, streamrec.ServiceError)
    assert issubclass(streamrec.RedisServiceError, streamrec.ServiceError)
    err = streamrec.RedisServiceError("read session", "ConnectionError: refused")
    assert str(err) == "Redis: read session failed: ConnectionError: refused"
    assert (err.service, err.operation) == ("redis", "read session")
