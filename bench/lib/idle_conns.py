#!/usr/bin/env python3
"""bench/run (h): many idle keep-alive TLS connections through a contender.

Opens --count TLS connections to --ip:443 (SNI api.bench.test, trusting --cafile), sends one
request on each (the placeholder in Authorization) and keeps it open and idle. The proxy's
RSS (VmRSS summed over --pids) is read before the first and after the last is open. While
all are open, one more connection makes --probes keep-alive requests one after another;
their latencies give the p50/p99. Prints one JSON object:

  {"open": N, "failed": N, "rss_before_kib": N, "rss_after_kib": N, "kib_per_connection": F,
   "p50_ms": F, "p99_ms": F, "probe_errors": N, "seconds_to_open": F}

Bounded: --count connections, --parallel handshakes at a time, --timeout seconds in all.
"""
import argparse, asyncio, json, resource, ssl, sys, time


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


REQUEST = "GET / HTTP/1.1\r\nHost: api.bench.test\r\nAuthorization: {auth}\r\n\r\n"


async def request(reader, writer, auth):
    writer.write(REQUEST.format(auth=auth).encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:40])


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ip", default="203.0.113.10")
    p.add_argument("--cafile", required=True)
    p.add_argument("--auth", required=True)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--parallel", type=int, default=64)
    p.add_argument("--probes", type=int, default=500)
    p.add_argument("--pids", default="")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.count + 1024)), hard))
    pids = [int(x) for x in args.pids.split()]
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    deadline = time.monotonic() + args.timeout

    async def connect():
        reader, writer = await asyncio.open_connection(args.ip, 443, ssl=ctx, server_hostname="api.bench.test")
        await request(reader, writer, args.auth)
        return reader, writer

    # A warm-up connection (the proxy's caches, the leaf) before the baseline.
    warm = await connect()
    warm[1].close()
    await asyncio.sleep(0.5)
    before = rss_kib(pids)
    t0 = time.monotonic()
    open_, failed = [], 0
    gate = asyncio.Semaphore(args.parallel)

    async def one():
        nonlocal failed
        async with gate:
            if time.monotonic() > deadline:
                failed += 1
                return
            try:
                open_.append(await asyncio.wait_for(connect(), 30))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, RuntimeError, ssl.SSLError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(args.count)))
    opened = time.monotonic() - t0
    await asyncio.sleep(1)
    after = rss_kib(pids)

    latencies, errors = [], 0
    try:
        reader, writer = await connect()
        for _ in range(args.probes):
            t = time.monotonic()
            try:
                await asyncio.wait_for(request(reader, writer, args.auth), 10)
                latencies.append((time.monotonic() - t) * 1000)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, RuntimeError):
                errors += 1
                reader, writer = await connect()
        writer.close()
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        errors += 1
    latencies.sort()

    def pct(q):
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    for _, w in open_:
        w.close()
    print(json.dumps({
        "open": len(open_), "failed": failed, "rss_before_kib": before, "rss_after_kib": after,
        "kib_per_connection": round((after - before) / len(open_), 2) if open_ and pids else None,
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "probe_errors": errors, "seconds_to_open": round(opened, 2),
    }))


if __name__ == "__main__":
    asyncio.run(main())
