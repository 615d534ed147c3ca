"""Check that .whl/ plus the GPU image's packages satisfy everything our code needs, on the device's Python.

    python bench/gpu/check_wheels.py [--wheels .whl] [--image bench/gpu/image_packages.txt]

Roots: the project's dependencies and its dataprep, pretrain, finetune and mpi extras (pyproject.toml).
Every requirement, and every Requires-Dist of every carried wheel (markers evaluated for CPython 3.12 on
x86-64 Linux, no extras), must be met by a carried wheel of a matching version or by a package of the image
(bench/gpu/image_packages.txt; names only: version floors on those are listed, not checked). Each carried wheel must be
installable there (a cp312 / py3 tag, manylinux up to glibc 2.39 = Ubuntu 24.04) and appear in one version
only (two versions stop the whole install). Exit 1 with the list of problems, else print a summary.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
EXTRAS = ("dataprep", "pretrain", "finetune", "mpi")
DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
DEVICE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + \
                   ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def device_tags() -> set:
    return set(cpython_tags((3, 12), platforms=DEVICE_PLATFORMS)) | \
        set(compatible_tags((3, 12), "cp312", platforms=DEVICE_PLATFORMS))


def root_requirements(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def wheel_requirements(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(zf.read(meta).decode())
    return [Requirement(r) for r in headers.get_all("Requires-Dist") or []]


def check(wheels: Path, image: Path, pyproject: Path) -> tuple[list[str], dict]:
    problems: list[str] = []
    present = {canonicalize_name(line.strip()) for line in image.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    carried: dict[str, tuple[str, Path]] = {}
    tags = device_tags()
    for path in sorted(wheels.glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
        if name in carried:
            problems.append(f"two versions of {name}: {carried[name][1].name} and {path.name}")
        carried[name] = (str(version), path)
        if not wheel_tags & tags:
            problems.append(f"{path.name}: no tag installable on CPython 3.12 / x86-64 Linux")
    pending = [(r, "pyproject.toml") for r in root_requirements(pyproject)]
    seen: set[tuple[str, str]] = set()
    unverified: set[str] = set()   # version floors on image packages: their versions are not known here
    while pending:
        req, wanted_by = pending.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate(DEVICE_ENV) or (name, str(req)) in seen:
            continue
        seen.add((name, str(req)))
        if name in carried:
            version, path = carried[name]
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{wanted_by} needs {req}, .whl has {path.name}")
            pending += [(r, path.name) for r in wheel_requirements(path)]
        elif name not in present and name != "flash-attn":
            problems.append(f"{wanted_by} needs {req}: neither carried in {wheels} nor in the image")
        elif req.specifier:
            unverified.add(f"{req} ({wanted_by})")
    size = sum(p.stat().st_size for _, p in carried.values())
    return problems, {"wheels": {n: v for n, (v, _) in sorted(carried.items())}, "bytes": size,
                      "image_versions_unverified": sorted(unverified)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl")
    ap.add_argument("--image", type=Path, default=REPO / "bench" / "gpu" / "image_packages.txt")
    ap.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    args = ap.parse_args(argv)
    problems, summary = check(args.wheels, args.image, args.pyproject)
    for p in problems:
        print(f"check_wheels: {p}", file=sys.stderr)
    if problems:
        return 1
    listing = ", ".join(f"{n} {v}" for n, v in summary["wheels"].items())
    print(f"check_wheels: OK, {len(summary['wheels'])} wheels ({summary['bytes'] / 2**20:.1f} MiB): {listing}")
    if summary["image_versions_unverified"]:
        print("check_wheels: left to the image (versions not checked here; session.sh imports them there): "
              + "; ".join(summary["image_versions_unverified"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
