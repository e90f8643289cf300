"""A loopback TCP proxy that adds a fixed latency to every byte sent to a server: a stand-in
for the round trip to a distant Cloud Storage bucket when benchmarking against a local GCS emulator.

    python -m lmjax.tools.delay_proxy --target 127.0.0.1:4443 --port 4444 --delay-ms 20

Each connection a client opens to 127.0.0.1:PORT is relayed to TARGET. Every chunk the
client sends is held until `delay` seconds after it arrived, then forwarded, in order; the
server's replies pass at once. An HTTP request therefore reaches the server `delay` later
than it was sent, however many requests are in flight (the delay is latency, not a
throughput limit): about what a request to a bucket one region away costs. Bounded: at
most `max_connections` connections, and at most `_QUEUED_CHUNKS` chunks of up to 64 KiB held
per connection (a client sending faster waits). Only loopback addresses are served and
targeted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import time

_CHUNK = 1 << 16
_QUEUED_CHUNKS = 64


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"delay_proxy serves and targets loopback addresses only, not {host}")
    return host


async def _delayed(reader, writer, delay: float) -> None:
    """Copies reader -> writer, each chunk `delay` seconds after it arrived."""
    queue: asyncio.Queue = asyncio.Queue(_QUEUED_CHUNKS)

    async def receive() -> None:
        while chunk := await reader.read(_CHUNK):
            await queue.put((time.monotonic() + delay, chunk))
        await queue.put((0.0, b""))

    receiving = asyncio.create_task(receive())
    try:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
    finally:
        receiving.cancel()
        writer.close()


async def _direct(reader, writer) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()


async def serve(target: tuple[str, int], port: int, delay: float, max_connections: int) -> None:
    """Serves 127.0.0.1:`port` until cancelled; prints the port once listening."""
    slots = asyncio.Semaphore(max_connections)

    async def relay(client_reader, client_writer) -> None:
        async with slots:
            try:
                server_reader, server_writer = await asyncio.open_connection(*target)
            except OSError:
                client_writer.close()
                return
            await asyncio.gather(
                _delayed(client_reader, server_writer, delay),
                _direct(server_reader, client_writer),
                return_exceptions=True,
            )

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the server (loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--max-connections", type=int, default=512)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = (_loopback(host), int(port))
    asyncio.run(serve(target, args.port, args.delay_ms / 1e3, args.max_connections))


if __name__ == "__main__":
    main()
