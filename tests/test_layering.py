"""Architecture rules, checked on the source: import direction, one key builder, light models,
and every import of project code by its installed name (``streamrec.<layer>``).

    serving  ->  streams  ->  infra  ->  models        (an arrow: "may import")
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "infra", "streams", "serving")
FORBIDDEN = {
    "models": {"infra", "streams", "serving"},
    "infra": {"streams", "serving"},
    "streams": {"serving"},
    "serving": set(),
}
KEY_LAYOUT = ":u:{"


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def imports_in(text: str, module_file: tuple[str, ...]) -> set[str]:
    """Absolute names of every module imported anywhere in ``text`` (functions included).

    ``module_file`` is the file's path parts relative to the root, e.g. ("infra", "state.py");
    relative imports are resolved against its installed package (``streamrec.infra``).
    """
    package = ["streamrec", *module_file[:-1]]  # for a/b/c.py and a/b/__init__.py alike: a.b
    out: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name:
                out.add(name)
            out.update(".".join(filter(None, (name, alias.name))) for alias in node.names)
    return out


def layer_of(name: str) -> str | None:
    """The layer a module name belongs to: ``streamrec.infra.keys`` -> ``infra``."""
    parts = name.split(".")
    return parts[1] if parts[0] == "streamrec" and len(parts) > 1 and parts[1] in FORBIDDEN else None


def violations(package: str, text: str, module_file: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imports_in(text, module_file) if layer_of(n) in FORBIDDEN[package])


def bare_imports(text: str) -> list[str]:
    """Imports of a layer by its folder name (``models.events``): such a module would only be
    found from a source checkout, and would be a second copy of the installed one."""
    return sorted(n for n in imports_in(text, ("x", "y.py")) if n.split(".")[0] in FORBIDDEN)


def test_every_layer_has_sources() -> None:
    for package in PACKAGES:
        assert len(sources(package)) >= 2, package


def test_the_checker_sees_relative_lazy_and_from_imports() -> None:
    text = (
        "import os\n"
        "def f():\n"
        "    from ..infra import keys\n"
        "    import streamrec.streams.sdk\n"
        "from . import events\n"
        "from .. import serving\n"
    )
    names = imports_in(text, ("models", "x.py"))
    assert {"streamrec.infra.keys", "streamrec.streams.sdk", "streamrec.models.events",
            "streamrec.serving"} <= names
    assert violations("models", text, ("models", "x.py")) == [
        "streamrec.infra", "streamrec.infra.keys", "streamrec.serving", "streamrec.streams.sdk"]
    assert violations("serving", text, ("serving", "x.py")) == []
    assert bare_imports("import models.events\nfrom infra import keys\nimport streamrec.models\n") == [
        "infra", "infra.keys", "models.events"]


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down_the_layers(package: str) -> None:
    bad = []
    for path in sources(package):
        parts = path.relative_to(ROOT).parts
        for name in violations(package, path.read_text(), parts):
            bad.append(f"{'/'.join(parts)} imports {name}")
    assert not bad, "\n".join(bad)


def test_project_code_is_imported_by_its_installed_name() -> None:
    bad = []
    for path in [*(p for package in PACKAGES for p in sources(package)), *sources("streamrec"),
                 *sources("tests"), *sources("scripts")]:
        for name in bare_imports(path.read_text()):
            bad.append(f"{path.relative_to(ROOT).as_posix()} imports {name}")
    assert not bad, "\n".join(bad)


def test_only_infra_keys_knows_the_key_layout() -> None:
    holders = [
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES for path in sources(package)
        if KEY_LAYOUT in path.read_text()
    ]
    assert holders == ["infra/keys.py"]


def test_importing_models_loads_no_client_library() -> None:
    code = (
        "import json, sys\n"
        "import streamrec, streamrec.models, streamrec.models.events, streamrec.models.session\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'redis', 'kafka', 'faust', 'aiokafka'})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
