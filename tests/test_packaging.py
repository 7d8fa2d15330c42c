"""The wheel adds exactly one top-level name, lite_sft, with export/ and serve/ inside it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with the venv's setuptools instead of fetching one.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, capture_output=True)
    (path,) = out.glob("lite_sft-*.whl")
    return path


def test_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lite_sft"}
    for module in ("lite_sft/cli.py", "lite_sft/train.py", "lite_sft/export/__init__.py",
                   "lite_sft/serve/__init__.py", "lite_sft/assets/skill_train.jsonl",
                   "lite_sft/assets/skill_eval.jsonl", "lite_sft/tasks/metrics.py"):
        assert module in names
    assert not any(n.startswith(("tests/", "benchmarks/", "export/", "serve/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lite-sft = lite_sft.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_holds_every_module_of_the_source(wheel):
    """pyproject lists the packages one by one (export/ and serve/ install through package-dir), so a new
    subpackage left off the list would install without its modules: every .py of the tree must be in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    roots = {"lite_sft": ROOT / "lite_sft", "lite_sft/export": ROOT / "export", "lite_sft/serve": ROOT / "serve"}
    missing = []
    for installed, folder in roots.items():
        for path in folder.rglob("*.py"):
            name = f"{installed}/{path.relative_to(folder).as_posix()}"
            if name not in names:
                missing.append(name)
    assert not missing, f"add their packages to pyproject.toml [tool.setuptools] packages: {sorted(missing)}"


def test_installed_wheel_imports_its_subpackages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import lite_sft, lite_sft.export, lite_sft.serve, lite_sft.cli; "
            "print(lite_sft.__file__, lite_sft.export.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout
    assert str(target) in out and "export" in out


def test_cli_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "lite_sft", "--help"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    for command in ("tune", "inspect-data", "generate"):
        assert command in out
    # --help must not pay for torch: the CLI imports heavy libraries inside commands.
    probe = "import sys, lite_sft.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
