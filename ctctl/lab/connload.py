#!/usr/bin/env python3
"""Short TCP connections, as many per second as the path allows: the two
ends of bench/bench_connrate.py and of the soak test, each run inside a
host namespace as `python -m ctctl.lab.connload ...`.

  connload.py server --port P --procs N
      N processes on one SO_REUSEPORT port; per connection: read one byte,
      write it back, close.  Runs until SIGTERM.
  connload.py client --addr A --port P --procs N --concurrency C --duration S
      N processes, C connections in flight in all; per connection: connect,
      write one byte, read the byte back, close.  Prints one JSON line:
      connections completed and failed, and the elapsed seconds.

Standard library only (asyncio), so that it starts in any namespace with
the interpreter that runs the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        b = await reader.read(1)
        if b:
            writer.write(b)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def _server_proc(port: int) -> None:
    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(4096)
        srv = await asyncio.start_server(_serve_one, sock=sock, backlog=4096)
        async with srv:
            await srv.serve_forever()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


async def _client_loop(addr: str, port: int, concurrency: int, deadline: float, timeout: float) -> dict:
    done = failed = 0
    latencies: list[float] = []

    async def one() -> None:
        nonlocal done, failed
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), timeout)
            try:
                writer.write(b"x")
                got = await asyncio.wait_for(reader.read(1), timeout)
            finally:
                writer.close()
            if got == b"x":
                done += 1
                latencies.append(time.monotonic() - t0)
            else:
                failed += 1
        except (OSError, asyncio.TimeoutError):
            failed += 1

    async def worker() -> None:
        while time.monotonic() < deadline:
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"done": done, "failed": failed, "latencies": latencies}


def _client_proc(args, concurrency: int, start: float, q) -> None:
    # Every process starts at the same instant and stops at the same deadline.
    time.sleep(max(0.0, start - time.time()))
    t0 = time.monotonic()
    res = asyncio.run(_client_loop(args.addr, args.port, concurrency, t0 + args.duration, args.timeout))
    res["elapsed"] = time.monotonic() - t0
    q.put(res)


def client(args) -> dict:
    q = mp.Queue()
    start = time.time() + 0.3
    shares = [args.concurrency // args.procs + (i < args.concurrency % args.procs) for i in range(args.procs)]
    procs = [mp.Process(target=_client_proc, args=(args, c, start, q)) for c in shares if c]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r["latencies"])

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 3) if lat else None
    elapsed = max(r["elapsed"] for r in results)
    done = sum(r["done"] for r in results)
    return {"done": done, "failed": sum(r["failed"] for r in results), "elapsed_s": round(elapsed, 3),
            "conn_per_s": round(done / elapsed, 1), "latency_ms": {"p50": pct(0.5), "p99": pct(0.99),
                                                                   "max": pct(1.0)},
            "procs": len(procs), "concurrency": args.concurrency}


def stop(proc, timeout: float = 10) -> None:
    """End a server this process started (a subprocess.Popen): SIGTERM, as
    it expects, then a kill if it does not go within `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--procs", type=int, default=1)
    c = sub.add_parser("client")
    c.add_argument("--addr", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--procs", type=int, default=1)
    c.add_argument("--concurrency", type=int, default=32)
    c.add_argument("--duration", type=float, default=5)
    c.add_argument("--timeout", type=float, default=5, help="seconds a connection may take (default 5)")
    args = ap.parse_args(argv)
    if args.role == "server":
        procs = [mp.Process(target=_server_proc, args=(args.port,)) for _ in range(args.procs)]
        for p in procs:
            p.start()
        print("listening", flush=True)

        def stop(*_):
            for p in procs:
                p.terminate()
            for p in procs:
                p.join()
            os._exit(0)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for p in procs:
            p.join()
        return 0
    print(json.dumps(client(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
