"""scripts/bench chaos: what a caller sees while dependencies fail.

Processes: user, search and recommend, each its own process over an embedded
PostgreSQL (a fresh state folder, free ports). Search runs with faults
injected by the runtime's fault interceptor, Istio-style, for the traffic that
carries `x-aimesh-chaos: on`: 10% of calls aborted UNAVAILABLE and 10% held
2 s (`AIMESH_FAULT_ABORT=UNAVAILABLE@10%`, `AIMESH_FAULT_DELAY=2s@10%`).

The load: 100 calls a second, open loop, for --duration seconds; a mix of
recommend `Recommend` (40%), search `Search` (40%) and user `GetUser` (20%).
Search queries repeat as users' do (Zipf-like over 300 distinct queries, so
about one in six is new to search's query cache and must be encoded). At
--kill-at seconds recommend is SIGKILLed; at --restart-at it is started again.

The "user" is this caller, built the way a service calls another: runtime
channels (`aimesh_runtime.client.connect`: deadlines, retries of idempotent
methods on UNAVAILABLE, retry throttling), a CircuitBreaker for recommend
(5 consecutive faults open it for 1 s) and a fallback for recommend (an empty,
degraded list, as a product page would show without recommendations), its
channel reconnecting at least once a second while recommend is down. Search
gets a 5 s deadline, so a call held 2 s is waited out, and a retry budget
tuned to its faults (SEARCH_RETRY_THROTTLING, below, says why). A
user-visible failure is a call that ends in an error for the user: neither a
real answer nor a fallback. A recommend answer flagged `fallback` (its
popularity ranking: no model is trained here) is recommend's own defined
answer and counts as real; the caller's empty list does not.

stderr has the outcomes by call kind (the caller's fallbacks by cause),
recommend's by phase, the breaker's openings, how long the restarted process
took to report SERVING, and the services' logs folder.

Figures (last line, one JSON object):
- user_visible_failures: such calls, over the whole run.
- breaker_open_after_failures: consecutive failures the recommend breaker had
  counted when it opened after the kill.
- calls_to_dead_backend_while_open: recommend calls sent while its breaker
  was OPEN (half-open trials excluded); counted at the send itself.
- recovery_s: from the restart until the first real recommend answer.
- success_rate_under_faults: search calls with a real answer ÷ search calls,
  under the injected faults (retries are allowed to absorb aborts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aimesh.recommend.v1 import recommend_service_pb2 as rec_pb
from aimesh.recommend.v1 import recommend_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2 as user_pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.client import connect
from aimesh_runtime.resilience import BreakerState, CircuitBreaker

CHAOS = ("x-aimesh-chaos", "on")
# Retry throttling for search, tuned to what this dependency does. The runtime's
# default (a failure costs a token, a success earns 0.1, retries stop below half
# of 10) keeps retries on only while under about 9% of attempts fail: at a
# steady 10% of aborts the bucket drains and sits at the threshold, so most
# aborts reached the user (S = 0.92 at 40 searches/s, search alone). Search's
# aborts are independent and transient (a sidecar reset, not an overloaded
# backend), a retry costs one more cheap attempt, and Search is NO_SIDE_EFFECTS;
# a success earning 0.3 keeps retries on up to about 23% of attempts failing -
# a retry budget of roughly a quarter of the traffic, like Finagle's and
# Linkerd's. A bucket of 100 rides out bursts of aborts: with 10, a few aborts
# close together withheld retries and a search failed for the user (2 runs in
# 6 at 1 attempt each; 0 in 12 with 100); against a dead backend retries still
# stop after about 50 failures.
SEARCH_RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 0.3}
# Five attempts, gRPC's most: with independent 10% aborts, four attempts fail
# one search in 10,000 (0.1^4); five make it one in 100,000.
SEARCH_MAX_ATTEMPTS = 5
SEARCH_FAULTS = {
    "AIMESH_FAULT_ABORT": "UNAVAILABLE@10%",
    "AIMESH_FAULT_DELAY": "2s@10%",
    "AIMESH_FAULT_HEADER": "x-aimesh-chaos=on",
}


class Caller:
    """The user-facing side: breaker + fallback + retries, counting what users see."""

    def __init__(self, addresses: dict[str, str], token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"), CHAOS)
        self.channels = {
            "user": connect(addresses["user"], user_pb.DESCRIPTOR.services_by_name["UserService"]),
            "search": connect(
                addresses["search"],
                search_pb.DESCRIPTOR.services_by_name["SearchService"],
                default_timeout_s=5.0,  # outlives the injected 2 s delay
                retry_throttling=SEARCH_RETRY_THROTTLING,
                max_attempts=SEARCH_MAX_ATTEMPTS,
            ),
            "recommend": connect(
                addresses["recommend"],
                rec_pb.DESCRIPTOR.services_by_name["RecommendService"],
                default_timeout_s=1.0,
                # Reconnect at least as often as the breaker tries (its reset
                # timeout): with gRPC's growing backoff the channel was still
                # waiting up to 4 s after the restarted recommend was SERVING.
                max_reconnect_backoff_s=1.0,
            ),
        }
        self.users = user_service_pb2_grpc.UserServiceStub(self.channels["user"])
        self.search = search_service_pb2_grpc.SearchServiceStub(self.channels["search"])
        self.recommend = recommend_service_pb2_grpc.RecommendServiceStub(self.channels["recommend"])
        self.opened_after: list[int] = []
        self.breaker = CircuitBreaker(
            "recommend", failure_threshold=5, reset_timeout_s=1.0, on_change=self._changed
        )
        self.counts: Counter[str] = Counter()
        self.sent_while_open = 0
        self.first_real_recommend_after: dict[float, float] = {}
        self.restarted_at: float | None = None
        self.serving_at: float | None = None  # the restarted process's health SERVING
        self.killed_at: float | None = None
        # Recommend outcomes by when the call was sent: before the kill, between the
        # kill and the first real answer after the restart, after that.
        self.phases: Counter[tuple[str, str]] = Counter()
        self.recovered_at: float | None = None

    def _changed(self, name: str, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            self.opened_after.append(self.breaker._failures)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    def _phase(self) -> str:
        if self.killed_at is None:
            return "before kill"
        return "kill to recovery" if self.recovered_at is None else "after recovery"

    async def call_recommend(self, user: str) -> None:
        phase = self._phase()
        outcome = await self._recommend(user)
        self.counts[f"recommend:{outcome}"] += 1
        self.phases[(phase, outcome)] += 1

    async def _recommend(self, user: str) -> str:
        async def operation() -> rec_pb.RecommendResponse:
            # The breaker's own view at the moment of sending: a send while it is
            # OPEN would be a call to a backend it has written off.
            if self.breaker._state is BreakerState.OPEN:
                self.sent_while_open += 1
            reply: rec_pb.RecommendResponse = await self.recommend.Recommend(
                rec_pb.RecommendRequest(user=user, k=10), metadata=self.metadata
            )
            return reply

        async def fallback(cause: BaseException) -> rec_pb.RecommendResponse | None:
            # The caller's own fallback (an empty, degraded list); why, for the record.
            causes.append(
                cause.code().name
                if isinstance(cause, grpc.aio.AioRpcError)
                else type(cause).__name__
            )
            return None

        causes: list[str] = []
        try:
            reply = await self.breaker.call_or_fallback(operation, fallback)
        except grpc.aio.AioRpcError as error:
            self.counts["user_visible_failures"] += 1
            return str(error.code().name)
        if reply is None:
            return f"fallback:{causes[0]}"
        # An answer from recommend, flagged or not: its popularity fallback (no model,
        # unknown user) is the service's own defined answer, not a failure.
        if self.restarted_at is not None and self.recovered_at is None:
            self.recovered_at = time.monotonic()
        return "ok:popularity" if reply.fallback else "ok"

    async def call_search(self, query: str) -> None:
        try:
            await self.search.Search(
                search_pb.SearchRequest(parent="collections/chaos", query=query, top_k=3),
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as error:
            self.counts[f"search:{error.code().name}"] += 1
            self.counts["user_visible_failures"] += 1
            attempts = dict(error.initial_metadata() or ()).get("grpc-previous-rpc-attempts", "0")
            print(
                f"search failed for the user: {error.code().name} {error.details()!r}"
                f" after {int(attempts) + 1} attempt(s)",
                file=sys.stderr,
            )
            return
        self.counts["search:ok"] += 1

    async def call_user(self) -> None:
        try:
            await self.users.GetUser(
                user_pb.GetUserRequest(name="users/me"), metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            self.counts[f"user:{error.code().name}"] += 1
            self.counts["user_visible_failures"] += 1
            return
        self.counts["user:ok"] += 1


async def setup_data(addresses: dict[str, str], token: str) -> None:
    """A collection to search (through no faults: the setup carries no chaos header)."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(addresses["search"]) as channel:
        stub = search_service_pb2_grpc.SearchServiceStub(channel)
        try:
            await stub.CreateCollection(
                search_pb.CreateCollectionRequest(
                    collection_id="chaos", collection=search_pb.Collection()
                ),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        await stub.UpsertDocuments(
            search_pb.UpsertDocumentsRequest(
                parent="collections/chaos",
                documents=[
                    search_pb.Document(
                        name=f"collections/chaos/documents/d{i}", text=f"bread recipe number {i}"
                    )
                    for i in range(20)
                ],
            ),
            metadata=metadata,
        )


def search_queries(rng: random.Random) -> Any:
    """Queries as users send them: a few popular ones often, a long tail rarely.

    Zipf-like (s = 1.1) over 300 distinct queries: over a 30 s run about one
    search in six is a query's first sighting, which search must encode (its
    query cache answers the rest), rather than one repeated query that is never
    encoded at all.
    """
    pool = [f"{a} {b} recipe" for a in WORDS for b in WORDS if a != b][:300]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(pool))]
    while True:
        yield rng.choices(pool, weights)[0]


WORDS = (
    "bread", "sourdough", "rye", "spelt", "brioche", "focaccia", "bagel", "naan",
    "pita", "ciabatta", "baguette", "challah", "pretzel", "scone", "muffin",
    "cornbread", "flatbread", "crumpet", "banana", "oat",
)  # fmt: skip


async def drive(args: Any, caller: Caller, restart: Any, kill: Any, user: str) -> float:
    rng = random.Random(1)
    queries = search_queries(random.Random(2))
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    killed = restarted = False
    for i in range(int(args.rate * args.duration)):
        intended = started + i / args.rate
        delay = intended - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elapsed = time.monotonic() - started
        if not killed and elapsed >= args.kill_at:
            killed = True
            kill()
        if not restarted and elapsed >= args.restart_at:
            restarted = True
            caller.restarted_at = time.monotonic()
            task = asyncio.create_task(restart())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        pick = rng.random()
        if pick < 0.4:
            job = caller.call_recommend(user)
        elif pick < 0.8:
            job = caller.call_search(next(queries))
        else:
            job = caller.call_user()
        task = asyncio.create_task(job)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while caller.recovered_at is None and time.monotonic() - (caller.restarted_at or 0) < 30:
        await caller.call_recommend(user)  # keep probing until recommend is back
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    return time.monotonic() - started


async def main_async(args: Any) -> dict[str, Any]:
    from aimesh_cli import local

    os.environ["AIMESH_PORT_OFFSET"] = str(local.free_port_offset())
    folder = Path(tempfile.mkdtemp(prefix="aimesh-chaos-"))
    stored = local.load_secrets(folder)
    with local.database_server(folder) as admin_url:
        urls = await local.provision(admin_url, stored["role_passwords"])
        env = local.service_environment(urls, stored, os.environ)
        env["AIMESH_RATE_LIMIT_RPS"] = "100000"
        env["AIMESH_RATE_LIMIT_BURST"] = "100000"
        logs = folder / "logs"
        processes = local.spawn(["user"], env, logs)
        processes += local.spawn(["search"], {**env, **SEARCH_FAULTS}, logs)
        processes += local.spawn(["recommend"], env, logs)
        try:
            await local.wait_serving(processes, timeout_s=120)
            addresses = {p.name: f"127.0.0.1:{p.port}" for p in processes}
            token = await local.login(
                addresses["user"], stored["admin_email"], stored["admin_password"]
            )
            await setup_data(addresses, token)
            async with grpc.aio.insecure_channel(addresses["user"]) as channel:
                me = await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
                    user_pb.GetUserRequest(name="users/me"),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
            caller = Caller(addresses, token)

            def kill() -> None:
                recommend = next(p for p in processes if p.name == "recommend")
                recommend.process.kill()
                recommend.process.wait()
                caller.killed_at = time.monotonic()
                print(f"killed recommend at {time.strftime('%X')}", file=sys.stderr)

            async def restart() -> None:
                fresh = local.spawn(["recommend"], env, logs)
                processes[:] = [p for p in processes if p.name != "recommend"] + fresh
                print(f"restarted recommend at {time.strftime('%X')}", file=sys.stderr)
                await local.wait_serving(fresh, timeout_s=60)
                caller.serving_at = time.monotonic()

            await drive(args, caller, restart, kill, me.user.name)
            await caller.close()
        finally:
            local.stop(processes, grace_s=5)
    counts = caller.counts
    searches = sum(v for k, v in counts.items() if k.startswith("search:"))
    recovered = (
        round(caller.recovered_at - caller.restarted_at, 2)
        if caller.recovered_at is not None and caller.restarted_at is not None
        else None
    )
    print(f"outcomes: {dict(sorted(counts.items()))}", file=sys.stderr)
    for phase in ("before kill", "kill to recovery", "after recovery"):
        seen = {o: n for (p, o), n in sorted(caller.phases.items()) if p == phase}
        print(f"recommend, {phase}: {seen}", file=sys.stderr)
    print(f"breaker opened after: {caller.opened_after}; logs in {logs}", file=sys.stderr)
    if caller.restarted_at is not None:
        serving = caller.serving_at
        print(
            "recovery: process SERVING (health) after "
            f"{serving - caller.restarted_at:.2f} s of the restart; first real answer "
            + (
                f"{caller.recovered_at - serving:+.2f} s after that"
                if serving is not None and caller.recovered_at is not None
                else "never"
            )
            if serving is not None
            else "recovery: the restarted process never reported SERVING",
            file=sys.stderr,
        )
    return {
        "bench": "chaos",
        "user_visible_failures": counts.get("user_visible_failures", 0),
        "breaker_open_after_failures": caller.opened_after[0] if caller.opened_after else None,
        "calls_to_dead_backend_while_open": caller.sent_while_open,
        "recovery_s": recovered,
        "success_rate_under_faults": round(counts.get("search:ok", 0) / searches, 5)
        if searches
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--kill-at", type=float, default=8.0)
    parser.add_argument("--restart-at", type=float, default=15.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
