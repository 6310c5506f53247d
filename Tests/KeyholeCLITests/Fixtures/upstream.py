#!/usr/bin/env python3
"""A test upstream: HTTPS (or plain HTTP) server that records every request it receives.

Each request becomes one JSON line in --log: method, path (with query), headers, body.
Responds 200 "ok" (never echoing what it received), or 101 for WebSocket upgrades, after
which it logs each client frame unmasked ({"ws": payload, "opcode": n}).
--slow N sleeps N ms between 64 KiB reads of a body (a slow reader, for backpressure tests).
--reflect answers paths under /reflect/ by echoing the request's Authorization value
(the bearer token, or the password of Basic credentials) back in many forms (see reflect()).
"""
import argparse, base64, gzip, json, socket, ssl, sys, threading, time, urllib.parse

def reflect(path, h):
    """A response (bytes) that hands back what it received, the ways real services do."""
    auth = h.get("authorization", "")
    token = auth.split(" ", 1)[1] if " " in auth else auth
    if auth.lower().startswith("basic "):
        token = base64.b64decode(token).decode().split(":", 1)[1]
    kind = path.split("?")[0].rsplit("/", 1)[-1]
    def ok(body, extra=b"", ctype=b"application/json"):
        return b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\n" + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    if kind == "header":
        return b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer error=\"invalid_token\", token=\"" + token.encode() + b"\"\r\nContent-Length: 0\r\n\r\n"
    if kind == "body":
        return ok(json.dumps({"headers": {"Authorization": auth}}).encode())
    if kind == "json":  # every character \u-escaped, and / as \/
        return ok(('{"error":"bad token \\/ ' + "".join("\\u%04x" % ord(c) for c in token) + '"}').encode())
    if kind == "percent":
        return ok(("token=" + urllib.parse.quote(token, safe="")).encode(), ctype=b"application/x-www-form-urlencoded")
    if kind == "base64":
        return ok(json.dumps({"basic": base64.b64encode(("user:" + token).encode()).decode(),
                              "url": base64.urlsafe_b64encode(("x" + token).encode()).decode()}).encode())
    if kind == "redirect":
        return b"HTTP/1.1 302 Found\r\nLocation: https://login.example.test/cb?" + path.split("?", 1)[-1].encode() + b"\r\nContent-Length: 0\r\n\r\n"
    if kind == "chunked":  # the value split across 3-byte chunks
        body = ("echo " + token + " done").encode()
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for i in range(0, len(body), 3):
            piece = body[i:i + 3]
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        return out + b"0\r\n\r\n"
    if kind == "gzip":  # compressed only when the client says it takes gzip
        body = json.dumps({"token": token}).encode()
        if "gzip" in h.get("accept-encoding", ""):
            return ok(gzip.compress(body), extra=b"Content-Encoding: gzip\r\n")
        return ok(body)
    if kind == "forced-gzip":  # compressed whatever the client asked
        return ok(gzip.compress(json.dumps({"token": token}).encode()), extra=b"Content-Encoding: gzip\r\n")
    if kind == "brotli":  # a coding Keyhole cannot read, whatever the client asked
        return ok(b"\x1b\x03\x00\xf8\xa5" + token.encode()[::-1], extra=b"Content-Encoding: br\r\n")
    if kind == "binary":  # no value: must arrive byte for byte
        return ok(bytes(range(256)) * 64 + b"%24\\u0024$MSB", ctype=b"application/octet-stream")
    return ok(b"unknown reflect kind")

def frame_header_length(buf):
    n = buf[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if buf[1] & 0x80 else 0)

def parse_frame_header(buf):
    opcode, n, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if n == 126:
        n, offset = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        n, offset = int.from_bytes(buf[2:10], "big"), 10
    key = None
    if buf[1] & 0x80:
        key, offset = buf[offset:offset + 4], offset + 4
    return opcode, n, key, offset

def handle(conn, args, lock):
    conn.settimeout(args.keepalive)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [l.split(":", 1) for l in lines[1:]]
            headers = [[k.strip(), v.strip()] for k, v in headers]
            h = {k.lower(): v for k, v in headers}
            body = b""
            total = 0
            if "content-length" in h:
                n = int(h["content-length"])
                while len(buf) < n and not args.discard:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if args.slow:
                        time.sleep(args.slow / 1000)
                if args.discard:
                    total = len(buf)
                    buf = b""
                    while total < n:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        total += len(chunk)
                        if args.slow:
                            time.sleep(args.slow / 1000)
                else:
                    body, buf = buf[:n], buf[n:]
                    total = len(body)
            elif h.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    while b"\r\n" not in buf:
                        buf += conn.recv(65536)
                    line, buf = buf.split(b"\r\n", 1)
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        while b"\r\n\r\n" not in b"\r\n" + buf:
                            buf += conn.recv(65536)
                        _, buf = (b"\r\n" + buf).split(b"\r\n\r\n", 1)
                        break
                    while len(buf) < size + 2:
                        buf += conn.recv(65536)
                    body += buf[:size]
                    buf = buf[size + 2:]
                total = len(body)
            record = {"method": method, "target": target, "headers": headers,
                      "body": body.decode("latin-1"), "body_length": total,
                      "peer": "%s:%d" % conn.getpeername()[:2]}
            with lock:
                with open(args.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if h.get("upgrade", "").lower() == "websocket":
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                # The client's frames (RFC 6455), unmasked: one {"ws": payload, "opcode": n} a frame.
                while True:
                    while len(buf) < 2 or len(buf) < frame_header_length(buf):
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    opcode, length, key, offset = parse_frame_header(buf)
                    while len(buf) < offset + length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    payload = bytes(b ^ key[i % 4] for i, b in enumerate(buf[offset:offset + length])) if key else buf[offset:offset + length]
                    buf = buf[offset + length:]
                    with lock:
                        with open(args.log, "a") as f:
                            f.write(json.dumps({"ws": payload.decode("latin-1"), "opcode": opcode}) + "\n")
            if args.reflect and target.startswith("/reflect/"):
                conn.sendall(reflect(target, h))
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n")
            if args.stray:
                # A misbehaving upstream: a second response nobody asked for, a little later.
                time.sleep(args.stray / 1000)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstray\n")
    except (OSError, ValueError):
        return
    finally:
        conn.close()

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--log", required=True)
    p.add_argument("--slow", type=int, default=0)
    p.add_argument("--discard", action="store_true", help="count body bytes instead of keeping them")
    p.add_argument("--reflect", action="store_true", help="echo the Authorization value back under /reflect/")
    p.add_argument("--keepalive", type=float, default=60, help="seconds an idle connection is kept open")
    p.add_argument("--stray", type=int, default=0, help="ms after each response: send a response nobody asked for")
    args = p.parse_args()
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(64)
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.set_alpn_protocols(["http/1.1"])
    print("ready", flush=True)
    lock = threading.Lock()
    while True:
        conn, _ = srv.accept()
        if ctx:
            try:
                conn.settimeout(10)
                conn = ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                continue
        threading.Thread(target=handle, args=(conn, args, lock), daemon=True).start()

if __name__ == "__main__":
    main()
