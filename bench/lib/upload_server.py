#!/usr/bin/env python3
"""Upstream for bench/run's upload workloads: an HTTPS server that reads whole request bodies.

Each request is read completely (Content-Length or chunked) before it is answered, so the
client's upload time covers every byte reaching the upstream. Body bytes are not kept: they
are scanned for the real value and the placeholder (occurrences split across reads are
counted), and one JSON line per request goes to --log:
  {"method", "target", "auth", "framing", "body_length", "real", "placeholder"}
Answers "200 ok". One thread per connection; recv_into a 1 MiB buffer.
With --download FILE, `GET /download` answers FILE (Content-Length, 1 MiB writes): the
response of an upstream that reflects the real value (bench/run puts it in every MiB).
"""
import argparse
import json
import os
import socket
import ssl
import sys
import threading


class Needle:
    def __init__(self, needle: bytes):
        self.needle = needle
        self.keep = len(needle) - 1
        self.tail = b""
        self.count = 0

    def feed(self, buf, a, b):
        if a >= b:
            return
        n = self.needle
        self.count += buf.count(n, a, b)
        # occurrences straddling the previous tail and this piece
        if self.tail:
            joined = self.tail + bytes(buf[a:min(b, a + self.keep)])
            self.count += joined.count(n)
        if b - a >= self.keep:
            self.tail = bytes(buf[b - self.keep:b])
        else:
            self.tail = (self.tail + bytes(buf[a:b]))[-self.keep:]


class Reader:
    def __init__(self, sock, size=1 << 20):
        self.sock = sock
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.s = 0
        self.e = 0

    def fill(self):
        if self.s == self.e:
            self.s = self.e = 0
        elif self.e == len(self.buf):
            n = self.e - self.s
            self.buf[0:n] = self.buf[self.s:self.e]
            self.s, self.e = 0, n
        k = self.sock.recv_into(self.mv[self.e:])
        if k == 0:
            raise EOFError
        self.e += k

    def until(self, sep: bytes, limit=65536) -> bytes:
        while True:
            i = self.buf.find(sep, self.s, self.e)
            if i >= 0:
                out = bytes(self.buf[self.s:i])
                self.s = i + len(sep)
                return out
            if self.e - self.s > limit:
                raise ValueError("line too long")
            self.fill()

    def consume(self, n, needles, dump=None):
        while n > 0:
            if self.s == self.e:
                self.fill()
            k = min(n, self.e - self.s)
            for nd in needles:
                nd.feed(self.buf, self.s, self.s + k)
            if dump:
                dump.write(self.mv[self.s:self.s + k])
            self.s += k
            n -= k


def handle(conn, args, lock):
    real = args.real.encode()
    placeholder = args.placeholder.encode()
    r = Reader(conn)
    try:
        while True:
            try:
                head = r.until(b"\r\n\r\n")
            except EOFError:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            h = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                h[k.strip().lower()] = v.strip()
            if method == "GET" and target == "/download" and args.download:
                size = os.path.getsize(args.download)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size)
                with open(args.download, "rb") as f:
                    while True:
                        block = f.read(1 << 20)
                        if not block:
                            break
                        conn.sendall(block)
                with lock:
                    with open(args.log, "a") as f:
                        f.write(json.dumps({"method": method, "target": target, "auth": h.get("authorization"),
                                            "framing": "none", "body_length": 0, "real": 0, "placeholder": 0,
                                            "sent": size}) + "\n")
                continue
            needles = [Needle(real), Needle(placeholder)]
            dump = open(args.dump, "wb") if args.dump else None
            total = 0
            framing = "none"
            if h.get("transfer-encoding", "").lower() == "chunked":
                framing = "chunked"
                while True:
                    size = int(r.until(b"\r\n").split(b";")[0], 16)
                    if size == 0:
                        while r.until(b"\r\n"):  # trailers
                            pass
                        break
                    r.consume(size, needles, dump)
                    total += size
                    if r.until(b"\r\n") != b"":
                        raise ValueError("bad chunk end")
            elif "content-length" in h:
                framing = "content-length"
                total = int(h["content-length"])
                r.consume(total, needles, dump)
            if dump:
                dump.close()
            record = {"method": method, "target": target, "auth": h.get("authorization"),
                      "framing": framing, "body_length": total,
                      "real": needles[0].count, "placeholder": needles[1].count}
            with lock:
                with open(args.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n")
    except (OSError, ValueError, EOFError) as e:
        print(f"upload_server: connection error: {e!r}", file=sys.stderr, flush=True)
    finally:
        conn.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--real", required=True)
    p.add_argument("--placeholder", required=True)
    p.add_argument("--dump", help="debugging: write the last request body to this file")
    p.add_argument("--download", help="the body GET /download answers with")
    args = p.parse_args()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(128)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["http/1.1"])
    open(args.log, "a").close()
    print("ready", flush=True)
    lock = threading.Lock()
    while True:
        conn, _ = srv.accept()
        try:
            conn.settimeout(10)
            conn = ctx.wrap_socket(conn, server_side=True)
            conn.settimeout(120)
        except (ssl.SSLError, OSError):
            conn.close()
            continue
        threading.Thread(target=handle, args=(conn, args, lock), daemon=True).start()


if __name__ == "__main__":
    main()
