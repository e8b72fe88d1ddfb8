"""Run `buf lint` on the contracts and `buf breaking` against main's contracts.

buf cannot reach its registry here, so both run on images that protoc builds
(see codegen.py). The breaking check compares the working tree with the ref in
AIMESH_BREAKING_AGAINST, by default origin/main, else main. On main itself
(as in CI) that compares main with its own working tree, which catches an
uncommitted break but not one already committed: branch work is where this
check bites. A missing ref is an error; a ref without contracts yet skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from codegen import PACKAGE, PROTOS, build_image

BUF = Path(sys.executable).parent / "buf"


def _buf(*args: str) -> None:
    result = subprocess.run([str(BUF), *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"buf {args[0]} failed:\n{result.stdout}{result.stderr}")


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=PROTOS.parent, capture_output=True)


def _baseline() -> str:
    wanted = os.environ.get("AIMESH_BREAKING_AGAINST")
    for ref in [wanted] if wanted else ["origin/main", "main"]:
        if _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode == 0:
            return ref
    sys.exit(f"buf breaking: no ref {wanted or 'origin/main or main'} to compare against")


def _export(ref: str, into: Path) -> bool:
    """Unpack protos/ of `ref` into `into`; False if the ref has none yet."""
    if _git("cat-file", "-e", f"{ref}:protos").returncode != 0:
        return False
    archive = _git("archive", "--format=tar", ref, "protos")
    if archive.returncode != 0:
        sys.exit(f"buf breaking: git archive {ref} failed: {archive.stderr.decode()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")  # Python 3.11.4 or newer
    return any((into / "protos" / PACKAGE).rglob("*.proto"))


def main() -> int:
    ref = _baseline()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        current = tmp / "current.binpb"
        build_image(current)
        _buf("lint", str(current), "--path", PACKAGE, "--config", str(PROTOS / "buf.yaml"))
        print("buf lint: clean")
        if not _export(ref, tmp / "old"):
            print(f"buf breaking: skipped, {ref} has no contracts yet")
            return 0
        previous = tmp / "previous.binpb"
        build_image(previous, tmp / "old" / "protos")
        _buf(
            "breaking",
            str(current),
            "--against",
            str(previous),
            "--path",
            PACKAGE,
            "--config",
            str(PROTOS / "buf.yaml"),
        )
        print(f"buf breaking: no breaking change against {ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
