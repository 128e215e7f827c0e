"""A lean HTTP/1.1 load generator for signed Stripe webhook deliveries.

    python -m bench.loadgen URL BODIES_FILE SECRET --connections 32 --seconds 4

Keep-alive connections on raw asyncio streams (uvloop when installed), so the generator spends
little of a small machine's CPU. Every request is signed when it is sent, the way Stripe signs:
`Stripe-Signature: t=<now>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. Bodies come from
BODIES_FILE (one JSON event per line); each carries a marker (the hex after `evt_bench` in its
id) that is replaced by a fresh one per request, so every delivery is a new event for new Stripe
objects. A fraction of requests (--duplicates, default 0.1) resends a body already sent, as
Stripe does on retries. Prints one JSON object: requests, seconds, statuses, latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Tally:
    latencies_us: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    duplicates_sent: int = 0


def sign(body: bytes, secret: bytes, timestamp: int) -> str:
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def load_bodies(path: str) -> list[tuple[bytes, bytes]]:
    """(body, marker) pairs; the marker is the unique part of the event id."""
    pairs = []
    with open(path, "rb") as f:
        for line in f:
            body = line.strip()
            if not body:
                continue
            event_id = json.loads(body)["id"]
            marker = event_id.split("evt_bench", 1)[1].encode()
            pairs.append((body, marker))
    if not pairs:
        raise SystemExit("loadgen: no bodies")
    return pairs


async def connection(
    host: str,
    port: int,
    path: str,
    secret: bytes,
    bodies: list[tuple[bytes, bytes]],
    sent: list[bytes],
    duplicates: float,
    start_at: float,
    stop_at: float,
    tally: Tally,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    rng = random.Random()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    try:
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            if sent and rng.random() < duplicates:
                body = rng.choice(sent)
                duplicate = True
            else:
                template, marker = rng.choice(bodies)
                body = template.replace(marker, uuid.uuid4().hex.encode())
                duplicate = False
                if len(sent) < 5000:
                    sent.append(body)
                else:
                    sent[rng.randrange(len(sent))] = body
            request = (
                head
                + f"Stripe-Signature: {sign(body, secret, int(time.time()))}\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            began = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            elapsed_us = int((time.perf_counter() - began) * 1e6)
            if not status_line:
                raise ConnectionError("server closed the connection")
            if now >= start_at:
                tally.latencies_us.append(elapsed_us)
                tally.statuses[int(status_line.split()[1])] += 1
                tally.duplicates_sent += duplicate
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.url)
    host = url.hostname or "127.0.0.1"
    port = url.port or 80
    bodies = load_bodies(args.bodies)
    sent: list[bytes] = []
    tally = Tally()
    start_at = time.monotonic() + args.warmup
    stop_at = start_at + args.seconds
    await asyncio.gather(
        *(
            connection(
                host,
                port,
                url.path,
                args.secret.encode(),
                bodies,
                sent,
                args.duplicates,
                start_at,
                stop_at,
                tally,
            )
            for _ in range(args.connections)
        )
    )
    return {
        "requests": len(tally.latencies_us),
        "seconds": args.seconds,
        "statuses": {str(k): v for k, v in tally.statuses.items()},
        "duplicates_sent": tally.duplicates_sent,
        "latencies_us": tally.latencies_us,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("bodies")
    parser.add_argument("secret")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duplicates", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
