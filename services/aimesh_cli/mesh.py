"""`aimesh mesh lint` and `aimesh mesh gen`: the deploy config against the contracts."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cmd_lint(args: argparse.Namespace) -> int:
    # Imported here: the lint needs PyYAML (a dev dependency), the images' CLI does not.
    from aimesh_cli.meshlint import built, rules, sources

    root = pathlib.Path(args.root)
    # The files as written, then what `kubectl apply -k` of each deployment sends.
    mesh = sources.load(root)
    findings = rules.lint(mesh)
    # A finding the files already show is not repeated for each build.
    shown = {(f.rule, f.message) for f in findings}
    findings += [f for f in built.lint(root, mesh) if (f.rule, f.message) not in shown]
    for finding in findings:
        print(finding)
    if findings:
        print(f"aimesh mesh lint: {len(findings)} finding(s)", file=sys.stderr)
        return 1
    return 0


def cmd_gen(args: argparse.Namespace) -> int:
    """Write the OpenAPI document and the gateway's copy of the descriptor set."""
    from aimesh_cli.meshlint import contracts, openapi, sources

    root = pathlib.Path(args.root)
    descriptor_path = contracts.default_descriptor_set(root)
    (root / sources.OPENAPI).write_text(
        openapi.render(contracts.load_descriptor_set(descriptor_path))
    )
    (root / sources.DESCRIPTOR_COPY).write_bytes(descriptor_path.read_bytes())
    return 0


def add_parser(commands: Any) -> None:
    mesh = commands.add_parser("mesh", help="check or generate the deploy config")
    actions = mesh.add_subparsers(dest="mesh_command", required=True)
    lint = actions.add_parser(
        "lint", help="check k8s/, istio/ and gateway_envoy/ (exit 1 on findings)"
    )
    lint.add_argument("--root", default=str(ROOT), help="repository root")
    lint.set_defaults(run=cmd_lint)
    gen = actions.add_parser(
        "gen", help="regenerate gateway_envoy/openapi.yaml and its descriptor set"
    )
    gen.add_argument("--root", default=str(ROOT), help="repository root")
    gen.set_defaults(run=cmd_gen)
