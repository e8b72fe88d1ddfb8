"""Run `buf lint` on the contracts and `buf breaking` against the released v1 baseline.

    python protos/buf_checks.py                     # lint, then breaking against the baseline
    python protos/buf_checks.py --refresh-baseline  # record the contracts as released (on purpose)

buf cannot reach its registry here, so both run on images that protoc builds
(see codegen.py). The baseline, baseline/aimesh-v1.binpb, is a committed image
of the contracts as released: comparing with a git ref instead compared main
with itself in CI and in a fresh clone, so a committed break passed. Refresh it
only when a release is cut, never to make a break pass.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from codegen import PACKAGE, PROTOS, build_image
from google.protobuf import descriptor_pb2

BUF = Path(sys.executable).parent / "buf"
BASELINE = PROTOS / "baseline" / "aimesh-v1.binpb"


def _run_buf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args, "--path", PACKAGE, "--config", str(PROTOS / "buf.yaml")],
        capture_output=True,
        text=True,
    )


def lint(image: Path) -> str:
    """buf lint's findings; empty when clean."""
    result = _run_buf("lint", str(image))
    return "" if result.returncode == 0 else f"{result.stdout}{result.stderr}"


def breaking(image: Path, against: Path = BASELINE) -> str:
    """buf breaking's findings of `image` against `against`; empty when compatible."""
    if not against.is_file():
        return f"no baseline at {against}: run protos/buf_checks.py --refresh-baseline"
    result = _run_buf("breaking", str(image), "--against", str(against))
    return "" if result.returncode == 0 else f"{result.stdout}{result.stderr}"


def write_baseline(root: Path = PROTOS, into: Path = BASELINE) -> None:
    """Record the contracts under `root` as the released baseline.

    Source info (comments, line numbers) is dropped: breaking ignores it, and
    without it a comment edit does not change the committed file."""
    with tempfile.TemporaryDirectory() as tmp_name:
        image = Path(tmp_name) / "image.binpb"
        build_image(image, root)
        files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())
    for file in files.file:
        file.ClearField("source_code_info")
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_bytes(files.SerializeToString(deterministic=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--refresh-baseline",
        action="store_true",
        help=f"write the current contracts to {BASELINE.relative_to(PROTOS.parent)}",
    )
    args = parser.parse_args()
    if args.refresh_baseline:
        write_baseline()
        print(f"buf breaking: baseline written to {BASELINE.relative_to(PROTOS.parent)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        current = Path(tmp_name) / "current.binpb"
        build_image(current)
        if problems := lint(current):
            sys.exit(f"buf lint failed:\n{problems}")
        print("buf lint: clean")
        if problems := breaking(current):
            sys.exit(f"buf breaking failed against the released baseline:\n{problems}")
        print(f"buf breaking: no breaking change against {BASELINE.relative_to(PROTOS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
