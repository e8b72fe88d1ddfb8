"""Generate the Python client package from the contracts, or check it is fresh.

    python protos/codegen.py            # write stubs, .pyi and the descriptor set
    python protos/codegen.py --check    # exit 1 if the committed output is stale
    python protos/codegen.py --image F  # write a buf image (with comments) to F

Everything runs offline: protoc comes from grpcio-tools, google/api from
googleapis-common-protos, and buf/validate/validate.proto from the descriptor
that the protovalidate wheel embeds (it ships no .proto file).
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
)

PROTOS = Path(__file__).resolve().parent
PACKAGE = "aimesh"
DESCRIPTOR_SET = PROTOS / PACKAGE / "descriptor_set.binpb"
VALIDATE_PROTO = "buf/validate/validate.proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"codegen: package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _validate_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """Read validate.proto's serialized descriptor out of the protovalidate wheel."""
    source = (_package_dir("protovalidate") / "_gen/buf/validate/validate_pb.py").read_text()
    marker = b"\n\x1b" + VALIDATE_PROTO.encode()
    for node in ast.walk(ast.parse(source)):
        is_bytes = isinstance(node, ast.Constant) and isinstance(node.value, bytes)
        if is_bytes and node.value.startswith(marker):
            return descriptor_pb2.FileDescriptorProto.FromString(node.value)
    raise SystemExit("codegen: no validate.proto descriptor found in protovalidate")


def _write_validate_set(path: Path) -> None:
    files = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        files.file.add().MergeFromString(module.DESCRIPTOR.serialized_pb)
    files.file.append(_validate_descriptor())
    path.write_bytes(files.SerializeToString())


def _sources(root: Path = PROTOS) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / PACKAGE).rglob("*.proto"))


def _protoc(args: list[str], validate_set: Path, root: Path = PROTOS) -> None:
    bin_dir = Path(sys.executable).parent
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--descriptor_set_in={validate_set}",
        f"-I{root}",
        f"-I{_package_dir('google')}/..",
        f"-I{_package_dir('grpc_tools')}/_proto",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"codegen: protoc failed\n{result.stderr}")


def generate(out: Path, validate_set: Path) -> None:
    sources = _sources()
    _protoc(
        [
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            "--include_imports",
            f"--descriptor_set_out={out / PACKAGE / DESCRIPTOR_SET.name}",
            *sources,
        ],
        validate_set,
    )
    _add_error_types(out / PACKAGE / DESCRIPTOR_SET.name)
    # Our generated code imports buf.validate.validate_pb2, which the
    # protovalidate wheel does not provide for google-protobuf, so we ship it.
    _protoc([f"--python_out={out}", f"--mypy_out={out}", VALIDATE_PROTO], validate_set)
    for directory in [
        out / PACKAGE,
        *(out / PACKAGE).rglob("*"),
        out / "buf",
        out / "buf/validate",
    ]:
        if directory.is_dir() and directory.name != "__pycache__":
            (directory / "__init__.py").touch()
    (out / PACKAGE / "py.typed").touch()


def _add_error_types(path: Path) -> None:
    """Add google.rpc.Status and the error details to the set: Envoy's transcoder needs
    them to turn a gRPC error into a JSON google.rpc.Status body for REST callers."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    present = {file.name for file in descriptor_set.file}
    for module in (any_pb2, duration_pb2, status_pb2, error_details_pb2):  # imports first
        if module.DESCRIPTOR.name not in present:
            added = descriptor_set.file.add()
            module.DESCRIPTOR.CopyToProto(added)
            present.add(added.name)
    path.write_bytes(descriptor_set.SerializeToString())


def _generated_files(root: Path) -> set[str]:
    found = set()
    for top in (PACKAGE, "buf"):
        for path in (root / top).rglob("*"):
            if path.is_file() and (
                path.name.endswith(GENERATED_SUFFIXES)
                or path.name in ("__init__.py", "py.typed", DESCRIPTOR_SET.name)
            ):
                found.add(str(path.relative_to(root)))
    return found


def build_image(image: Path, root: Path = PROTOS) -> None:
    """Write a buf image (descriptor set with imports and comments) of `root`."""
    with tempfile.TemporaryDirectory() as tmp_name:
        validate_set = Path(tmp_name) / "validate.binpb"
        _write_validate_set(validate_set)
        _protoc(
            [
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={image.resolve()}",
                *_sources(root),
            ],
            validate_set,
            root,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    parser.add_argument("--image", type=Path, help="write a buf image with source info here")
    args = parser.parse_args()
    if args.image:
        build_image(args.image)
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        validate_set = tmp / "validate.binpb"
        _write_validate_set(validate_set)
        out = tmp / "out"
        out.mkdir()
        for proto in _sources():
            (out / proto).parent.mkdir(parents=True, exist_ok=True)
        generate(out, validate_set)
        fresh, committed = _generated_files(out), _generated_files(PROTOS)
        if args.check:
            stale = sorted(fresh ^ committed) + sorted(
                name
                for name in fresh & committed
                if not filecmp.cmp(out / name, PROTOS / name, shallow=False)
            )
            if stale:
                print("codegen: generated code is stale; run scripts/gen:", *stale, sep="\n  ")
                return 1
            print(f"codegen: {len(fresh)} generated files are fresh")
            return 0
        for name in committed - fresh:
            (PROTOS / name).unlink()
        for name in fresh:
            (PROTOS / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / name, PROTOS / name)
        print(f"codegen: wrote {len(fresh)} files under {os.path.relpath(PROTOS)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
