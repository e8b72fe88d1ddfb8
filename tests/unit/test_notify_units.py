"""Units of the notify service: the SSRF guard, backoff, signatures, sealed
secrets, cursors, and the webhook HTTP client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import os
import time
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aimesh.webhooks import WebhookError
from aimesh.webhooks import verify as verify_webhook
from aimesh_notify import netguard
from aimesh_notify.delivery_store import Claimed
from aimesh_notify.events import decode_cursor, encode_cursor
from aimesh_notify.netguard import DeniedUrl, NetworkGuard, denial
from aimesh_notify.queue import ReceiverPauses, WebhookSender, backoff_s, receiver_failed
from aimesh_notify.sealing import SealError, SecretBox, UnknownKey, key_id
from aimesh_notify.signing import Signed, new_secret, signature_header
from aimesh_runtime.errors import InvalidArgument


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.0.0.1", "172.31.255.255", "192.168.0.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "224.0.0.251", "255.255.255.255", "::1", "::", "fe80::1", "fd00:ec2::254",
     "fc00::1", "ff02::1", "::ffff:10.0.0.1", "64:ff9b::a00:1",
     # IPv4-compatible and -translated forms of the metadata address and of public ones
     "::a9fe:a9fe", "::169.254.169.254", "::ffff:0:a9fe:a9fe", "::8.8.8.8", "::ffff:0:8.8.8.8",
     # not globally routable though on no explicit list
     "2001:10::1", "2001:20::1"],
)  # fmt: skip
def test_denied_addresses(address: str) -> None:
    assert denial(ipaddress.ip_address(address)) is not None


def test_an_embedded_ipv4_address_is_checked_even_where_its_prefix_is_not_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The explicit list is the second check: without it, is_global and the
    # embedded address still refuse the metadata endpoint in every IPv6 form.
    monkeypatch.setattr(netguard, "_NETWORKS", ())
    for address in ("::a9fe:a9fe", "::ffff:0:a9fe:a9fe", "64:ff9b::a9fe:a9fe",
                    "2002:a9fe:a9fe::1", "::ffff:169.254.169.254"):  # fmt: skip
        assert "169.254.169.254" in (denial(ipaddress.ip_address(address)) or "")


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert denial(ipaddress.ip_address(address)) is None


async def test_guard_refuses_schemes_credentials_and_denied_names() -> None:
    guard = NetworkGuard(allow_private=False)
    for url in ("ftp://93.184.216.34/", "http://u:p@93.184.216.34/", "http:///x", "http://[::1/"):
        with pytest.raises(DeniedUrl):
            await guard.check(url)
    with pytest.raises(DeniedUrl, match="loopback"):
        await guard.check("http://localhost:8080/")
    target = await guard.check("https://93.184.216.34:8443/hook")
    assert (target.host, target.port, target.address) == ("93.184.216.34", 8443, "93.184.216.34")
    relaxed = await NetworkGuard(allow_private=True).check("http://127.0.0.1:9/")
    assert relaxed.address is None


async def test_a_name_rebound_to_a_denied_address_is_refused_at_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter([[ipaddress.ip_address("93.184.216.34")], [ipaddress.ip_address("127.0.0.1")]])

    async def rebinding(host: str, port: int) -> Any:
        return next(answers)

    monkeypatch.setattr(netguard, "resolve", rebinding)
    guard = NetworkGuard(allow_private=False)
    await guard.check("http://hooks.example.com/x")  # at creation: public
    sender = WebhookSender(guard, 1)
    claimed = Claimed(1, "sub", uuid.uuid4(), 1, False, "http://hooks.example.com/x",
                      1000, ("s",), "e", "t.x", b"{}", "application/json")  # fmt: skip
    try:
        status, error = await sender.send(claimed)  # at delivery: loopback, nothing sent
    finally:
        await sender.close()
    assert status == 0 and error.startswith("denied:") and "loopback" in error


def test_backoff_is_exponential_with_full_jitter() -> None:
    assert [backoff_s(n, 2.0, 60.0, lambda: 1.0) for n in (1, 2, 3, 5, 9)] == [
        2.0, 4.0, 8.0, 32.0, 60.0]  # fmt: skip
    assert backoff_s(3, 2.0, 60.0, lambda: 0.0) == 0.0
    assert backoff_s(10_000, 2.0, 60.0, lambda: 0.5) == 30.0


OLD, NEW, OTHER = new_secret(), new_secret(), new_secret()


def delivery_headers(signed: Signed, signature: str) -> dict[str, str]:
    return {
        "aimesh-delivery": signed.delivery_id,
        "aimesh-event-id": signed.event_id,
        "aimesh-topic": signed.topic,
        "aimesh-attempt": "1",
        "aimesh-timestamp": str(signed.timestamp),
        "aimesh-signature": signature,
    }


def test_a_receiver_is_paused_after_failures_in_a_row_for_doubling_pauses() -> None:
    now = [1000.0]
    pauses = ReceiverPauses(threshold=3, first_s=5.0, max_s=12.0, clock=lambda: now[0])
    assert [pauses.record("a", failed=True) for _ in range(3)] == [0.0, 0.0, 5.0]
    assert pauses.remaining_s("a") == 5.0 and pauses.remaining_s("b") == 0.0
    # Attempts under way when it paused end during the pause: not counted again.
    assert [pauses.record("a", failed=True) for _ in range(5)] == [0.0] * 5
    now[0] += 5.0
    assert [pauses.record("a", failed=True) for _ in range(3)] == [0.0, 0.0, 10.0]
    now[0] += 10.0
    assert [pauses.record("a", failed=True) for _ in range(3)] == [0.0, 0.0, 12.0]  # capped
    assert pauses.record("a", failed=False) == 0.0 and pauses.remaining_s("a") == 0.0
    assert [pauses.record("a", failed=True) for _ in range(3)] == [0.0, 0.0, 5.0]  # anew
    # Failures of one subscription are not another's; an answer resets the count.
    assert [pauses.record("b", failed=f) for f in (True, True, False, True, True)] == [0.0] * 5
    never = ReceiverPauses(threshold=0, first_s=5.0, max_s=5.0)
    assert all(never.record("a", failed=True) == 0.0 for _ in range(10))


def test_only_a_missing_answer_a_server_error_or_429_counts_against_a_receiver() -> None:
    assert receiver_failed(0, "timed out after 10 s")
    assert receiver_failed(0, "ConnectionRefusedError: refused")
    assert receiver_failed(503, "HTTP 503") and receiver_failed(429, "HTTP 429")
    assert not receiver_failed(200, "") and not receiver_failed(404, "HTTP 404")
    assert not receiver_failed(0, "internal: the webhook secret does not open")


def test_signatures_cover_timestamp_body_and_the_headers_acted_on() -> None:
    signed, body = Signed(1700000000, "42", "ev1", "user.deleted"), b'{"a":1}'
    header = signature_header([OLD, NEW], signed, body)
    assert header.count("v1=") == 2 and header.count("v2=") == 2
    headers = delivery_headers(signed, header)
    at = signed.timestamp
    for secret in (OLD, NEW):
        assert verify_webhook(body, headers, secret, now=at).delivery_id == "42"
    with pytest.raises(WebhookError):
        verify_webhook(body, headers, OTHER, now=at)
    # Replayed under another id, event or topic, or with another body: v2 fails.
    for name, value in [
        ("aimesh-delivery", "43"),
        ("aimesh-event-id", "ev2"),
        ("aimesh-topic", "user.registered"),
    ]:
        with pytest.raises(WebhookError, match="no signature matches"):
            verify_webhook(body, {**headers, name: value}, NEW, now=at)
    with pytest.raises(WebhookError, match="no signature matches"):
        verify_webhook(b'{"a":2}', headers, NEW, now=at)
    # v1 alone (a notify before v2) passes only when asked for, and covers the body.
    v1_only = {**headers, "aimesh-signature": header.split(",")[0]}
    with pytest.raises(WebhookError, match="only v1 signatures"):
        verify_webhook(body, v1_only, OLD, now=at)
    assert verify_webhook(body, v1_only, OLD, now=at, accept_v1_only=True).topic == ("user.deleted")
    with pytest.raises(WebhookError, match="no signature matches"):
        verify_webhook(b'{"a":2}', v1_only, OLD, now=at, accept_v1_only=True)


def test_sealed_secrets_open_only_under_their_key_and_subscription() -> None:
    box = SecretBox(bytes(32))
    sealed = box.seal("sub1", "whsec_abc")
    assert sealed.startswith(f"aesgcm2:{key_id(bytes(32))}:") and "whsec_abc" not in sealed
    assert box.seal("sub1", "whsec_abc") != sealed  # a fresh nonce each time
    assert box.open("sub1", sealed) == "whsec_abc"
    assert box.open("sub1", "whsec_legacy") == "whsec_legacy"  # plaintext from before
    assert box.reseal("sub1", sealed) == sealed and box.reseal("s", None) is None
    assert box.open("sub1", box.reseal("sub1", "whsec_old") or "") == "whsec_old"
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    other_key = SecretBox(b"\x01" * 32)
    for subscription, stored, other in [
        ("sub2", sealed, box),  # moved onto another row
        ("sub1", sealed.replace(box.key_id, other_key.key_id), other_key),  # another key
        ("sub1", tampered, box),
        ("sub1", f"{box.prefix}not*base64", box),
        ("sub1", box.prefix, box),
        ("sub1", "aesgcm1:", box),
    ]:
        with pytest.raises(SealError, match=f"subscriptions/{subscription} does not open"):
            other.open(subscription, stored)


def sealed_before_key_ids(key: bytes, subscription_id: str, secret: str) -> str:
    """A secret as sealed by releases before key ids ("aesgcm1:")."""
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, secret.encode(), subscription_id.encode())
    return "aesgcm1:" + base64.urlsafe_b64encode(nonce + ciphertext).decode()


def test_a_rotated_key_opens_what_the_old_one_sealed_and_reseals_it() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = SecretBox(old_key)
    sealed_old = old.seal("sub1", "whsec_abc")
    legacy = sealed_before_key_ids(old_key, "sub1", "whsec_legacy")
    assert old.open("sub1", legacy) == "whsec_legacy"

    alone = SecretBox(new_key)
    with pytest.raises(UnknownKey, match=f"sealed under key {old.key_id}") as raised:
        alone.open("sub1", sealed_old)
    assert raised.value.key_id == old.key_id
    with pytest.raises(SealError):
        alone.open("sub1", legacy)

    rotating = SecretBox(new_key, [old_key])
    assert rotating.key_id == alone.key_id != old.key_id
    assert rotating.open("sub1", sealed_old) == "whsec_abc"
    assert rotating.open("sub1", legacy) == "whsec_legacy"
    resealed = rotating.reseal("sub1", sealed_old) or ""
    assert rotating.is_current(resealed) and not rotating.is_current(sealed_old)
    assert alone.open("sub1", resealed) == "whsec_abc"  # the old key is no longer needed
    assert alone.open("sub1", rotating.reseal("sub1", legacy) or "") == "whsec_legacy"
    assert rotating.reseal("sub1", resealed) == resealed


def test_the_client_package_checks_headers_timestamps_and_secrets() -> None:
    signed, body = Signed(1_700_000_000, "42", "ev1", "user.deleted"), b'{"job": 1}'
    now = signed.timestamp
    headers = {
        **delivery_headers(signed, signature_header([OLD, NEW], signed, body)),
        "aimesh-attempt": "3",
    }
    headers["Aimesh-Delivery"] = headers.pop("aimesh-delivery")  # frameworks vary the case
    delivery = verify_webhook(body, headers, [NEW], now=now + 10)
    assert (delivery.delivery_id, delivery.event_id, delivery.topic, delivery.attempt) == (
        "42", "ev1", "user.deleted", 3
    )  # fmt: skip
    assert verify_webhook(body, headers, OLD, now=now - 299).timestamp == now
    bad = [
        (body, headers, [], now, "no secret"),
        (body, headers, [NEW], now + 301, "beyond the 300 s allowed"),  # a replay
        (body, {**headers, "aimesh-timestamp": str(now + 1)}, [NEW], now, "no signature"),
        (body, {**headers, "aimesh-timestamp": "soon"}, [NEW], now, "whole number"),
        (body, {**headers, "aimesh-signature": "v0=abc"}, [NEW], now, "no signature in"),
    ]
    for sent_body, sent_headers, secrets, at, reason in bad:
        with pytest.raises(WebhookError, match=reason):
            verify_webhook(sent_body, sent_headers, secrets, now=at)


def test_verify_refuses_empty_or_malformed_secrets() -> None:
    signed, body = Signed(1_700_000_000, "42", "ev1", "user.deleted"), b"{}"
    for secret in ("", "whsec_", "whsec_short", " " + NEW, NEW + "!", "sk_" + NEW[6:]):
        # Signed with that very secret: a receiver with an unset variable holds "".
        headers = delivery_headers(signed, signature_header([secret], signed, body))
        for secrets in (secret, [secret], [NEW, secret]):
            with pytest.raises(WebhookError, match="not a notify webhook secret"):
                verify_webhook(body, headers, secrets, now=signed.timestamp)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("aimesh-timestamp", "1" * 5000, "whole number"),
        ("aimesh-timestamp", "9" * 400, "whole number"),
        ("aimesh-timestamp", "١٧٠٠٠٠٠٠٠٠", "whole number"),  # Arabic-Indic digits
        ("aimesh-timestamp", "１７００００００００", "whole number"),  # full-width digits
        ("aimesh-timestamp", "-1700000000", "whole number"),
        ("aimesh-timestamp", "1" * 13, "whole number"),
        ("aimesh-signature", "v2=" + "é" * 64, "64 lowercase hex"),
        ("aimesh-signature", "v2=" + "A" * 64, "64 lowercase hex"),
        ("aimesh-signature", "v2=" + "a" * 63, "64 lowercase hex"),
        ("aimesh-signature", "v2=" + "a" * 5000, "64 lowercase hex"),
        ("aimesh-signature", "v2=", "64 lowercase hex"),
        ("aimesh-attempt", "9" * 5000, "no signature matches"),  # read as 0, then the check
    ],
)
def test_verify_raises_only_webhook_error_on_crafted_headers(
    name: str, value: str, reason: str
) -> None:
    signed, body = Signed(1_700_000_000, "42", "ev1", "user.deleted"), b"{}"
    headers = delivery_headers(signed, signature_header([NEW], signed, body))
    tampered = {**headers, name: value}
    if name == "aimesh-attempt":
        tampered["aimesh-delivery"] = "43"
    with pytest.raises(WebhookError, match=reason):
        verify_webhook(body, tampered, NEW, now=signed.timestamp)
    assert verify_webhook(body, headers, NEW, now=signed.timestamp).attempt == 1


def test_cursors_round_trip_and_garbage_is_invalid() -> None:
    assert decode_cursor(encode_cursor(42)) == 42 and decode_cursor("") is None
    for bad in ("garbage", encode_cursor(-1), "W10"):
        with pytest.raises(InvalidArgument):
            decode_cursor(bad)


# Answers of a scripted HTTP server, one per request on a connection; after
# the list the connection is closed.
SCRIPTS: dict[str, list[bytes]] = {
    "/length": [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"] * 3,
    "/chunked": [
        b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n"
    ]
    * 3,
    "/interim": [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"] * 3,
    "/until-close": [b"HTTP/1.0 200 OK\r\n\r\nthe whole answer"],
    "/once": [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],  # then closes, idle
    "/huge": [b"HTTP/1.1 500 Oops\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100_000],
    "/garbage": [b"SMTP ready\r\n\r\n"],
    "/silent": [],
}


async def scripted_server() -> tuple[Any, list[int]]:
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            for index in range(10):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                script = SCRIPTS[head.split(b" ")[1].decode().split("?")[0]]
                if index >= len(script):
                    break
                writer.write(script[index])
                await writer.drain()
                if index == len(script) - 1:
                    break  # the script is over: close
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, connections


def claimed_for(url: str) -> Claimed:
    return Claimed(1, "sub", uuid.uuid4(), 1, False, url, 2000, ("s",), "e", "t.x", b"{}",
                   "application/json")  # fmt: skip


async def test_the_webhook_client_reads_every_kind_of_answer_and_reuses_connections() -> None:
    server, connections = await scripted_server()
    port = server.sockets[0].getsockname()[1]
    sender = WebhookSender(NetworkGuard(allow_private=True), 4)
    base = f"http://127.0.0.1:{port}"
    try:
        for path, expected in [("/length", 200), ("/chunked", 202), ("/interim", 204)]:
            before = len(connections)
            for _ in range(3):
                assert await sender.send(claimed_for(base + path)) == (expected, "")
            assert len(connections) - before == 1  # one keep-alive connection for all three
        assert await sender.send(claimed_for(base + "/until-close")) == (200, "")
        # The server closes this one once idle: the next request must not fail for it.
        assert await sender.send(claimed_for(base + "/once")) == (200, "")
        await asyncio.sleep(0.05)
        assert await sender.send(claimed_for(base + "/length?a=b c")) == (200, "")
        assert await sender.send(claimed_for(base + "/huge")) == (500, "HTTP 500")
        status, error = await sender.send(claimed_for(base + "/garbage"))
        assert status == 0 and "ProtocolError" in error
        status, error = await sender.send(claimed_for(base + "/silent"))
        assert status == 0 and "closed the connection" in error
        status, error = await sender.send(claimed_for("http://127.0.0.1:9/refused"))
        assert status == 0 and error
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()


async def test_a_receiver_that_never_answers_times_out_on_a_fresh_or_a_reused_connection() -> None:
    server, _ = await scripted_server()
    port = server.sockets[0].getsockname()[1]

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers the first request, then reads the next and says nothing.
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        with contextlib.suppress(Exception):
            await reader.read()
        writer.close()

    silent = await asyncio.start_server(mute, "127.0.0.1", 0)
    silent_url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}/hook"
    sender = WebhookSender(NetworkGuard(allow_private=True), 4)
    short = dataclasses.replace(claimed_for(silent_url), timeout_ms=200)
    try:
        assert await sender.send(short) == (200, "")
        started = time.monotonic()
        status, error = await sender.send(short)  # the kept connection, now mute
        assert (status, error) == (0, "timed out after 0.2 s")
        assert 0.2 <= time.monotonic() - started < 1.0
        assert await sender.send(claimed_for(f"http://127.0.0.1:{port}/length")) == (200, "")
    finally:
        await sender.close()
        for each in (server, silent):
            each.close()
            await each.wait_closed()
