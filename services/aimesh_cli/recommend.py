"""`aimesh recommend train` (a job on the service, with a progress bar) and
`aimesh recommend eval` (the offline harness: HR@10 and NDCG@10 against popularity)."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc

from aimesh.recommend.v1 import recommend_service_pb2 as pb
from aimesh.recommend.v1 import recommend_service_pb2_grpc
from aimesh_cli import local

BAR_WIDTH = 30


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    recommend = commands.add_parser("recommend", help="train and evaluate recommendation models")
    recommend.add_argument("--target", help="host:port of the recommend service")
    recommend.add_argument("--host", default="127.0.0.1")
    recommend.add_argument("--monolith", action="store_true")
    recommend.add_argument(
        "--token", help="access token (default: $AIMESH_TOKEN, else the dev admin)"
    )
    actions = recommend.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a model version, with a progress bar")
    train.add_argument("--version", default="", help='e.g. "v2"; default: the next free')
    train.add_argument("--epochs", type=int, default=0, help="0: the service's default")
    train.add_argument("--job", help="training job id; the same id finds the same job")
    train.set_defaults(run=_reporting(_train))
    evaluate = actions.add_parser(
        "eval", help="HR@10 and NDCG@10 vs popularity on held-out data, offline"
    )
    evaluate.add_argument(
        "--file", type=Path, help="MovieLens ratings (ratings.dat, u.data or ratings.csv)"
    )
    evaluate.add_argument("--epochs", type=int, default=20)
    evaluate.add_argument("--dimension", type=int, default=32)
    evaluate.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(run=cmd_eval)


def _target(args: argparse.Namespace) -> str:
    return str(
        args.target
        or f"{args.host}:{local.grpc_port('monolith' if args.monolith else 'recommend')}"
    )


def _reporting(
    action: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(action(args))
        except grpc.aio.AioRpcError as error:
            print(f"aimesh: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1

    return run


def bar(fraction: float, note: str) -> str:
    filled = round(BAR_WIDTH * min(max(fraction, 0.0), 1.0))
    return f"\r[{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {fraction * 100:5.1f}%  {note}"


async def _train(args: argparse.Namespace) -> int:
    token = await local.caller_token(args.token, args.host, args.monolith)
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(_target(args)) as channel:
        stub = recommend_service_pb2_grpc.RecommendServiceStub(channel)
        reply = await stub.TrainModel(
            pb.TrainModelRequest(
                training_job_id=args.job or uuid.uuid4().hex[:16],
                training_job=pb.TrainingJob(model_version=args.version, epochs=args.epochs),
            ),
            metadata=metadata,
            timeout=30,
        )
        job = reply.training_job
        final = (
            pb.TRAINING_JOB_STATE_SUCCEEDED,
            pb.TRAINING_JOB_STATE_FAILED,
            pb.TRAINING_JOB_STATE_CANCELLED,
        )
        while job.state not in final:
            note = f"{job.model_version}: epoch {job.completed_epochs}/{job.epochs}"
            if job.completed_epochs:
                note += f", loss {job.loss:.4f}"
            print(bar(job.progress, note), end="", file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)
            job = (
                await stub.GetTrainingJob(
                    pb.GetTrainingJobRequest(name=job.name), metadata=metadata, timeout=10
                )
            ).training_job
        print(bar(job.progress, f"{job.model_version}: done"), file=sys.stderr)
        state = pb.TrainingJobState.Name(job.state).removeprefix("TRAINING_JOB_STATE_")
        print(f"{job.name}: {state}, model version {job.model_version}")
        if job.state == pb.TRAINING_JOB_STATE_SUCCEEDED:
            versions = await stub.ListModelVersions(
                pb.ListModelVersionsRequest(page_size=500), metadata=metadata, timeout=10
            )
            for version in versions.model_versions:
                if version.version == job.model_version:
                    for key, value in sorted(version.metrics.items()):
                        print(f"  {key:<24} {value:.4f}")
        elif job.error_message:
            print(f"  {job.error_message}", file=sys.stderr)
    return 0 if job.state == pb.TRAINING_JOB_STATE_SUCCEEDED else 1


def cmd_eval(args: argparse.Namespace) -> int:
    # The harness is the recommend service's own module, run in its own process:
    # the CLI imports no service package (and needs no torch).
    command = [sys.executable, "-m", "aimesh_recommend.evaluation"]
    if args.file is not None:
        command += ["--file", str(args.file)]
    command += ["--epochs", str(args.epochs), "--dimension", str(args.dimension)]
    command += ["--device", args.device, "--seed", str(args.seed)]
    return subprocess.run(command, check=False).returncode
