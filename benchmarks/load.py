"""The benchmarks' one load generator: a closed loop of keep-alive HTTP/1.1 connections.

Used by bench.py (hfserve alone) and peers.py / gpu.py (hfserve next to other servers), so that every
server is measured by the same client. ``concurrency`` workers each hold one connection and send
their next request as soon as the previous answer is in (a closed loop, like wrk or oha), until
``total`` requests are done. Requests are pre-encoded JSON; answers are checked (status) and decoded.

Streaming (``Connection.stream_post``) reads an SSE answer chunk by chunk, so the time to the first
event that carries a choice (TTFT) is measured on the same connection and with the same client.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

EVENT_END = re.compile(rb"\r?\n\r?\n")  # SSE events end with a blank line (LF or CRLF)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Connection:
    """One keep-alive HTTP/1.1 connection: the load generator's client.

    The load generator shares the machine's cores with the server, so every millisecond of
    CPU it spends on a request is taken from the server and measured as server slowness.
    httpx spends about 1.8 ms of CPU per request (on the 2-core machine of docs/benchmarks.md);
    this client, like wrk or oha, sends pre-encoded requests over one persistent connection and
    reads the status line, the headers and a Content-Length or chunked body: about 0.2 ms.
    Responses are still checked: the status must be the expected one and the body is decoded.
    """

    def __init__(self, url: str):
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        self.host, self.port = host, int(port or 80)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _send(self, method: str, path: str, body: bytes) -> tuple[int, int, bool, bool]:
        """Send a request and read its head: (status, content length, chunked, close)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=2**22)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status = int((await self.reader.readuntil(b"\r\n")).split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n"):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close"
        return status, length, chunked, close

    async def _chunks(self):
        assert self.reader is not None
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
            yield (await self.reader.readexactly(size + 2))[:-2]
        await self.reader.readuntil(b"\r\n")

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        status, length, chunked, close = await self._send(method, path, body)
        assert self.reader is not None
        if chunked:
            payload = b"".join([part async for part in self._chunks()])
        else:
            payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def post_json(self, path: str, body: bytes, expect: int = 200) -> Any:
        status, payload = await self.request("POST", path, body)
        if status != expect:
            raise RuntimeError(f"POST {path}: expected {expect}, got {status}: {payload[:300]!r}")
        return json.loads(payload)

    async def stream_post(self, path: str, body: bytes) -> tuple[float, list[dict]]:
        """POST a streaming request; (seconds to the first event with a choice, every SSE event decoded).

        Works for a chunked answer and for one with a Content-Length or none (read to the end)."""
        t0 = time.perf_counter()
        status, length, chunked, close = await self._send("POST", path, body)
        assert self.reader is not None
        ttft = float("nan")
        events: list[dict] = []
        buf = b""

        def take(data: bytes) -> None:
            nonlocal buf, ttft
            buf += data
            while m := EVENT_END.search(buf):
                event, buf = buf[: m.start()], buf[m.end() :]
                for line in event.split(b"\n"):
                    line = line.strip()
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    obj = json.loads(line[5:])
                    events.append(obj)
                    if ttft != ttft and obj.get("choices"):  # nan: not set yet
                        ttft = time.perf_counter() - t0

        if chunked:
            async for part in self._chunks():
                take(part)
        elif length:
            take(await self.reader.readexactly(length) + b"\n\n")
        else:
            take(await self.reader.read() + b"\n\n")
            close = True
        if status != 200:
            raise RuntimeError(f"POST {path} (stream): got {status}: {buf[:300]!r} {events[:1]}")
        if close:
            await self.close()
        return ttft, events

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def closed_loop(url: str, concurrency: int, total: int, call) -> tuple[float, list[float], list]:
    """``concurrency`` workers, one connection each, run ``call(conn, i)`` until ``total`` calls
    are done; (wall, latencies, results)."""
    latencies: list[float] = []
    results: list = []
    counter = iter(range(total))

    async def worker() -> None:
        conn = Connection(url)
        try:
            for i in counter:
                t0 = time.perf_counter()
                results.append(await call(conn, i))
                latencies.append(time.perf_counter() - t0)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies, results
