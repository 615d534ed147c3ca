"""bench/gpu/check_wheels.py: the carried wheel set is judged complete and installable for the GPU's Python 3.12."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from bench.gpu.check_wheels import check

REPO = Path(__file__).resolve().parents[2]

PYPROJECT = """
[project]
name = "x"
dependencies = ["numpy>=1.24", "deepspeed==0.19.8"]
[project.optional-dependencies]
dataprep = ["zstandard>=0.22"]
pretrain = []
finetune = []
mpi = []
"""


def wheel(folder: Path, filename: str, requires: list[str] = ()) -> None:
    name, version = filename.split("-")[:2]
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + \
        "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / filename, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "image.txt").write_text("# image\nnumpy\ntorch\ntyping-extensions\n")
    wheels = tmp_path / "whl"
    wheels.mkdir()
    wheel(wheels, "deepspeed-0.19.8-py3-none-any.whl", ["torch>=2.0", "hjson", 'pywin32; sys_platform == "win32"',
                                                        'pytest; extra == "dev"'])
    wheel(wheels, "hjson-3.1.0-py3-none-any.whl")
    wheel(wheels, "zstandard-0.25.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    return wheels, tmp_path / "image.txt", tmp_path / "pyproject.toml"


def test_complete_set_passes_and_lists_unverified_image_versions(setup):
    problems, summary = check(*setup)
    assert problems == []
    assert summary["wheels"] == {"deepspeed": "0.19.8", "hjson": "3.1.0", "zstandard": "0.25.0"}
    assert "torch>=2.0 (deepspeed-0.19.8-py3-none-any.whl)" in summary["image_versions_unverified"]


def test_missing_dependency_second_version_wrong_version_and_wrong_python_are_reported(setup):
    wheels, image, pyproject = setup
    (wheels / "hjson-3.1.0-py3-none-any.whl").unlink()
    wheel(wheels, "zstandard-0.24.0-cp312-cp312-manylinux2014_x86_64.whl")
    (wheels / "deepspeed-0.19.8-py3-none-any.whl").rename(wheels / "deepspeed-0.19.7-py3-none-any.whl")
    wheel(wheels, "viennarna-2.8.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    problems, _ = check(wheels, image, pyproject)
    text = "\n".join(problems)
    assert "deepspeed-0.19.7-py3-none-any.whl needs hjson: neither carried" in text
    assert "two versions of zstandard" in text
    assert "pyproject.toml needs deepspeed==0.19.8, .whl has deepspeed-0.19.7-py3-none-any.whl" in text
    assert "viennarna-2.8.0-cp311-cp311-manylinux_2_28_x86_64.whl: no tag installable on CPython 3.12" in text


def test_prepared_wheel_set_is_complete():
    """The real .whl/ from bench/gpu/prepare.sh, against this pyproject and the recorded GPU image."""
    wheels = REPO / ".whl"
    if not any(wheels.glob("deepspeed-*.whl")):
        pytest.skip("no .whl/ here: run bash bench/gpu/prepare.sh (needs network) to build it")
    problems, summary = check(wheels, REPO / "bench/gpu/image_packages.txt", REPO / "pyproject.toml")
    assert problems == []
    assert {"deepspeed", "webdataset", "zstandard", "pydantic", "pydantic-core"} <= set(summary["wheels"])
