"""A workload of many concurrent connections, made of real sockets, for
experiments (ctctl.lab.experiment): run `server` in the server's namespace
and `client` in the client's.

The mix (every part optional):

- long: `count` TCP connections open at once, each sending `rate` bytes/s
  to the server for its `lifetime` seconds, then closing (FIN) and being
  replaced by a new one: churn at a steady population.
- short: `rate` request/response connections per second, opened on a
  schedule whatever the earlier ones do (an open loop: the box, not the
  generator, decides how many finish); each asks the server for `size`
  bytes and closes after reading them.
- udp: `count` UDP flows, each sending one datagram every `every` seconds
  (staggered) and expecting it echoed: idle flows that the offload
  timeouts, not FINs, end.

A size or lifetime is a number or `{exp: MEAN}` (exponentially
distributed, the usual model of flow sizes and lifetimes).  One asyncio
loop holds every socket, so thousands of concurrent connections cost file
descriptors, not threads.  The client prints one JSON line at the end:
what it did, and what failed.

  python -m ctctl.lab.workload server --port 7200
  python -m ctctl.lab.workload client --addr 192.0.2.2 --port 7200 --duration 10 --mix '{"short": {"rate": 100}}'
  python -m ctctl.lab.workload selftest --mix '{"short": {"rate": 2000}}'   # the generator's own limit, over lo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time

CHUNK_S = 0.1          # a long connection writes its rate in slices of this
MAX_SHORT_IN_FLIGHT = 4000
MIX_KEYS = {"long": {"count", "rate", "lifetime"}, "short": {"rate", "size"}, "udp": {"count", "every", "size"}}
DEFAULTS = {"long": {"count": 1, "rate": 1_000_000, "lifetime": 1e9}, "short": {"rate": 10, "size": 1000},
            "udp": {"count": 10, "every": 1.0, "size": 64}}


class MixError(ValueError):
    """A workload mix that does not describe one (the message says why)."""


def check_mix(mix) -> dict:
    """The mix with its defaults, or MixError naming the bad part."""
    if not isinstance(mix, dict) or not mix:
        raise MixError(f"the workload is a mapping of {', '.join(MIX_KEYS)}")
    out = {}
    for part, spec in mix.items():
        if part not in MIX_KEYS:
            raise MixError(f"unknown workload part {part!r} (expected {', '.join(MIX_KEYS)})")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise MixError(f"workload {part}: a mapping of {', '.join(sorted(MIX_KEYS[part]))}")
        bad = set(spec) - MIX_KEYS[part]
        if bad:
            raise MixError(f"workload {part}: unknown key {sorted(bad)[0]!r} "
                           f"(expected {', '.join(sorted(MIX_KEYS[part]))})")
        full = {**DEFAULTS[part], **spec}
        for k, v in full.items():
            _check_value(f"workload {part}.{k}", v, k in ("count",))
        out[part] = full
    return out


def _check_value(what: str, v, integer: bool) -> None:
    if isinstance(v, dict):
        if set(v) != {"exp"} or integer:
            raise MixError(f"{what}: a number" + ("" if integer else " or {exp: MEAN}") + f", not {v!r}")
        v = v["exp"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (integer and not isinstance(v, int)):
        raise MixError(f"{what}: a {'whole ' if integer else ''}number >= 0, not {v!r}")


def draw(v, rng: random.Random) -> float:
    return rng.expovariate(1.0 / v["exp"]) if isinstance(v, dict) else float(v)


# -- the server ---------------------------------------------------------------------

async def _serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A line `SIZE\\n` asks for SIZE bytes back (short); `SINK\\n` sends a
    stream to be read until its FIN (long)."""
    try:
        line = await reader.readline()
        if line.startswith(b"SINK"):
            while await reader.read(1 << 16):
                pass
        else:
            n = int(line or b"0")
            while n > 0:
                k = min(n, 1 << 16)
                writer.write(b"x" * k)
                n -= k
                await writer.drain()
            await reader.read()          # the client's FIN first: it closes, as clients do
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def serve(port: int, host: str = "0.0.0.0") -> None:
    server = await asyncio.start_server(_serve_tcp, host, port, backlog=4096, reuse_address=True)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(_UdpEcho, local_addr=(host, port))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


# -- the client ---------------------------------------------------------------------

class Client:
    def __init__(self, addr: str, port: int, mix: dict, duration: float, seed: int = 1):
        self.addr, self.port, self.mix, self.duration = addr, port, mix, duration
        self.rng = random.Random(seed)
        self.out = {part: {} for part in mix}
        self.latencies: list[float] = []
        self.short_in_flight = 0

    def count(self, part: str, what: str, n: int = 1) -> None:
        self.out[part][what] = self.out[part].get(what, 0) + n

    async def run(self) -> dict:
        self.end = time.monotonic() + self.duration
        tasks = []
        if "long" in self.mix:
            tasks += [asyncio.create_task(self._long_slot()) for _ in range(self.mix["long"]["count"])]
        if "short" in self.mix:
            tasks.append(asyncio.create_task(self._short_schedule()))
        if "udp" in self.mix:
            tasks += [asyncio.create_task(self._udp_flow(i)) for i in range(self.mix["udp"]["count"])]
        await asyncio.gather(*tasks)
        if self.latencies:
            xs = sorted(self.latencies)
            self.out["short"]["latency_p50_ms"] = round(xs[len(xs) // 2] * 1e3, 2)
            self.out["short"]["latency_p99_ms"] = round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3, 2)
        return self.out

    async def _long_slot(self) -> None:
        spec = self.mix["long"]
        while time.monotonic() < self.end:
            life = min(draw(spec["lifetime"], self.rng), self.end - time.monotonic())
            per_slice = max(1, int(draw(spec["rate"], self.rng) * CHUNK_S))
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.addr, self.port), 10)
            except (OSError, asyncio.TimeoutError):
                self.count("long", "failed")
                await asyncio.sleep(1)
                continue
            self.count("long", "opened")
            try:
                writer.write(b"SINK\n")
                stop = time.monotonic() + life
                while time.monotonic() < stop:
                    writer.write(b"y" * per_slice)
                    await writer.drain()
                    self.count("long", "bytes", per_slice)
                    await asyncio.sleep(CHUNK_S)
                writer.write_eof()
                await writer.drain()
                self.count("long", "closed")
            except OSError:
                self.count("long", "failed")
            finally:
                writer.close()

    async def _short_schedule(self) -> None:
        spec = self.mix["short"]
        rate = float(spec["rate"])
        if rate <= 0:
            return
        start, i, tasks = time.monotonic(), 0, set()
        while True:
            at = start + i / rate
            if at >= self.end:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            i += 1
            if self.short_in_flight >= MAX_SHORT_IN_FLIGHT:
                self.count("short", "skipped")      # the generator's own bound, said
                continue
            t = asyncio.create_task(self._short_one(int(draw(spec["size"], self.rng))))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=15)

    async def _short_one(self, size: int) -> None:
        self.short_in_flight += 1
        self.count("short", "started")
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.addr, self.port), 10)
            try:
                writer.write(f"{size}\n".encode())
                got = len(await asyncio.wait_for(reader.readexactly(size), 10)) if size else 0
                writer.write_eof()
                await writer.drain()
                self.count("short", "done")
                self.count("short", "bytes", got)
                self.latencies.append(time.monotonic() - t0)
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            self.count("short", "failed")
        finally:
            self.short_in_flight -= 1

    async def _udp_flow(self, i: int) -> None:
        spec = self.mix["udp"]
        loop = asyncio.get_running_loop()
        every = float(spec["every"])
        echoed = asyncio.Queue()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                echoed.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=(self.addr, self.port))
        try:
            at = time.monotonic() + every * i / max(1, spec["count"])     # staggered
            while at < self.end:
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                msg = os.urandom(max(8, int(draw(spec["size"], self.rng))))
                transport.sendto(msg)
                self.count("udp", "sent")
                try:
                    while await asyncio.wait_for(echoed.get(), min(every, 2.0)) != msg:
                        pass
                    self.count("udp", "echoed")
                except asyncio.TimeoutError:
                    pass
                at += every
        finally:
            transport.close()


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctctl.lab.workload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="TCP (sink and request/response) and UDP echo on one port")
    s.add_argument("--port", type=int, default=7200)
    for name in ("client", "selftest"):
        c = sub.add_parser(name, help="run the mix against a server" if name == "client" else
                           "client and server in this namespace over lo: the generator's own limit")
        if name == "client":
            c.add_argument("--addr", required=True)
        c.add_argument("--port", type=int, default=7200)
        c.add_argument("--duration", type=float, default=10.0)
        c.add_argument("--mix", required=True, help="the mix as JSON (see above)")
        c.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    _raise_nofile()
    if a.cmd == "server":
        try:
            asyncio.run(serve(a.port))
        except KeyboardInterrupt:
            pass
        return 0
    try:
        mix = check_mix(json.loads(a.mix))
    except (ValueError, MixError) as e:
        print(f"workload: {e}", file=sys.stderr)
        return 2

    async def go(addr):
        server = asyncio.create_task(serve(a.port, "127.0.0.1")) if a.cmd == "selftest" else None
        if server is not None:
            await asyncio.sleep(0.2)
        t0, c0 = time.monotonic(), time.process_time()
        out = await Client(addr, a.port, mix, a.duration, a.seed).run()
        out["wall_s"] = round(time.monotonic() - t0, 3)
        out["cpu_s"] = round(time.process_time() - c0, 3)      # the generator's own (both sides in selftest)
        if server is not None:
            server.cancel()
        return out

    out = asyncio.run(go(getattr(a, "addr", "127.0.0.1")))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
