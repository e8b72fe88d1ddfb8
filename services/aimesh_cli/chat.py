"""`aimesh chat`: an interactive terminal client that streams answers as they arrive.

Each line you type is one StreamChat call in one conversation. Text is
printed as it comes; degraded notes go to stderr before the text they
affect; citations, usage and how the answer ended follow it. Ctrl-C during
an answer cancels that call (the service then closes the model's stream);
Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

import grpc

from aimesh.chat.v1 import chat_service_pb2 as pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from aimesh_cli import local

DEGRADED = {value: name.removeprefix("DEGRADED_REASON_").lower()
            for name, value in pb.DegradedReason.items()}  # fmt: skip
STOPS = {value: name.removeprefix("STOP_REASON_").lower() for name, value in pb.StopReason.items()}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chat = commands.add_parser("chat", help="chat with the chat service, streaming answers")
    chat.add_argument("--target", help="host:port of the chat service")
    chat.add_argument("--host", default="127.0.0.1")
    chat.add_argument("--monolith", action="store_true")
    chat.add_argument("--collection", default="", help="ground answers in collections/NAME")
    chat.add_argument("--top-k", type=int, default=0, help="passages to retrieve (0: 5)")
    chat.add_argument("--conversation", default="", help="continue conversations/ID")
    chat.add_argument("--token", help="access token (default: $AIMESH_TOKEN, else the dev admin)")
    chat.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_chat(args, sys.stdin, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        return 0


async def _chat(args: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    target = (
        args.target or f"{args.host}:{local.grpc_port('monolith' if args.monolith else 'chat')}"
    )
    collection = args.collection
    if collection and not collection.startswith("collections/"):
        collection = f"collections/{collection}"
    metadata = (
        (
            "authorization",
            f"Bearer {await local.caller_token(args.token, args.host, args.monolith)}",
        ),
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        conversation = args.conversation
        if not conversation:
            created = await stub.CreateConversation(
                pb.CreateConversationRequest(
                    conversation=pb.Conversation(display_name="aimesh chat")
                ),
                metadata=metadata,
            )
            conversation = created.conversation.name
        print(f"{conversation} (Ctrl-D to quit, Ctrl-C to stop an answer)", file=err)
        loop = asyncio.get_running_loop()
        while True:
            print("> ", end="", file=err, flush=True)
            line = await loop.run_in_executor(None, stdin.readline)
            if not line:
                return 0
            if not line.strip():
                continue
            request = pb.StreamChatRequest(
                conversation=conversation, message=line.strip(), collection=collection,
                top_k=args.top_k,
            )  # fmt: skip
            call = stub.StreamChat(request, metadata=metadata)
            try:
                await _show(call, out, err)
            except KeyboardInterrupt:
                call.cancel()
                print("\n[cancelled]", file=err)
            except grpc.aio.AioRpcError as error:
                print(f"\n[{error.code().name}] {error.details()}", file=err)


async def _show(call: grpc.aio.UnaryStreamCall, out: TextIO, err: TextIO) -> None:
    async for event in call:
        kind = event.WhichOneof("event")
        if kind == "text_delta":
            out.write(event.text_delta)
            out.flush()
        elif kind == "degraded":
            reason = DEGRADED.get(event.degraded.reason, "?")
            print(f"[degraded: {reason}] {event.degraded.message}", file=err, flush=True)
        elif kind == "citations":
            print(f" [sources: {', '.join(event.citations.documents)}]", file=err, flush=True)
        elif kind == "usage":
            usage = event.usage
            print(f"\n[tokens: {usage.input_tokens} in, {usage.output_tokens} out]", file=err)
        elif kind == "finish":
            finish = event.finish
            partial = ", partial" if finish.partial else ""
            print(f"[{STOPS.get(finish.stop_reason, '?')}{partial}]", file=err, flush=True)
    print(file=out)
