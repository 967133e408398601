"""Gather the wheels benchmarks/gpu.sh installs on an offline GPU machine that has CUDA torch.

What fedray's training, DP and serving code needs beyond what that machine's image already
holds (benchmarks/gpu_image_packages.txt: one distribution name a line), at this
environment's versions, for the GPU machine's Python:
  - pip resolves ray[train,tune,serve], pydantic and python-multipart for that Python and
    platform, and every distribution the image lacks is downloaded (no dependencies: each one
    is named), with opacus and captum, which would pull in torch;
  - typing-extensions and protobuf always, for their version floors;
  - tools that fedray never runs are left out (virtualenv, distlib and python-discovery are
    for runtime_env virtualenvs; py-spy is the dashboard's profiler);
  - Ray's wheel is repacked without ray/jars (its Java workers, 32 MB of an 80 MB wheel) as
    ray-VERSION-slim.tar.xz, which gpu.sh unpacks beside the installed wheels.

    python benchmarks/gpu_wheels.py --output .gpu-wheels [--python 3.12]   (make gpu-wheels)
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
             "linux_x86_64", "any"]
RESOLVED = ["ray[train,tune,serve]", "pydantic", "python-multipart", "typing-extensions"]
NO_DEPS = ["opacus", "captum"]  # each requires torch, which the image has
NEVER_RUN = {"virtualenv", "distlib", "python-discovery", "py-spy"}
# carried even where the image has them: pydantic and OpenTelemetry want newer ones than an
# image may hold (typing-extensions >= 4.16, protobuf >= 5), and both are small
ALWAYS = {"typing-extensions", "protobuf"}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pinned(name: str) -> str:
    base = name.split("[")[0]
    return f"{name}=={metadata.version(base)}"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                   check=True)


def target_flags(python: str) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def resolve(python: str, work: Path) -> dict[str, str]:
    """name -> version of everything RESOLVED needs on the target Python and platform."""
    report = work / "report.json"
    pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
        "--target", str(work / "target"), *target_flags(python), *map(pinned, RESOLVED))
    rows = json.loads(report.read_text())["install"]
    return {canonical(r["metadata"]["name"]): r["metadata"]["version"] for r in rows}


def slim_ray(wheel: Path, output: Path) -> Path:
    """Ray's wheel as a tar.xz of its installed tree, without the Java workers."""
    name = wheel.name.split("-")
    archive = output / f"ray-{name[1]}-slim.tar.xz"
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            for member in z.infolist():
                if member.filename.startswith("ray/jars/"):
                    continue
                path = Path(z.extract(member, tmp))
                mode = member.external_attr >> 16  # zipfile drops it: raylet must stay +x
                if mode and not member.is_dir():
                    path.chmod(mode & 0o777)
        (record,) = Path(tmp).glob("ray-*.dist-info/RECORD")
        record.write_text("".join(line for line in record.read_text().splitlines(keepends=True)
                                  if not line.startswith("ray/jars/")))
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            for item in sorted(Path(tmp).iterdir()):
                tar.add(item, arcname=item.name)
    wheel.unlink()
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (X.Y)")
    parser.add_argument("--have", type=Path, default=HERE / "gpu_image_packages.txt",
                        help="distributions the GPU machine's image holds, one a line")
    args = parser.parse_args()
    have = {canonical(line.strip()) for line in args.have.read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = resolve(args.python, Path(tmp))
    wanted = sorted(f"{n}=={v}" for n, v in resolved.items()
                    if (n not in have or n in ALWAYS) and n not in NEVER_RUN)
    wanted += [pinned(n) for n in NO_DEPS]
    pip("download", "--quiet", "--no-deps", *target_flags(args.python), "-d", str(args.output),
        *wanted)
    for wheel in args.output.glob("ray-*.whl"):
        print("repacked", slim_ray(wheel, args.output).name)
    size = sum(f.stat().st_size for f in args.output.iterdir()) / 2**20
    print(f"{len(wanted)} distributions in {args.output} ({size:.0f} MiB)")


if __name__ == "__main__":
    main()
