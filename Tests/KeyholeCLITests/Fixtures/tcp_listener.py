#!/usr/bin/env python3
"""A service that must stay unreachable: records every connection (or datagram) it gets.

Each accepted TCP connection becomes a JSON line {"event": "accept", "peer": ...} in --log
the moment it is accepted, and every read {"event": "data", "peer": ..., "data": ...}.
With --udp it records each datagram as {"event": "datagram", ...} instead. With --http it
answers a request head with 200 and --body (a metadata-like service); with --banner it
speaks first (SMTP-style) and echoes nothing; with --silent it reads and never answers,
logging only how much it got when the peer closes; otherwise it answers nothing. Prints
"ready" once it listens.
"""
import argparse, json, socket, threading

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--udp", action="store_true")
    p.add_argument("--http", action="store_true")
    p.add_argument("--body", default="listener-private-data")
    p.add_argument("--banner")
    p.add_argument("--silent", action="store_true")
    args = p.parse_args()
    lock = threading.Lock()

    def record(**fields):
        with lock:
            with open(args.log, "a") as f:
                f.write(json.dumps(fields) + "\n")

    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    if args.udp:
        srv = socket.socket(family, socket.SOCK_DGRAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((args.bind, args.port))
        print("ready", flush=True)
        while True:
            data, peer = srv.recvfrom(65535)
            record(event="datagram", peer="%s:%d" % peer[:2], data=data.decode("latin-1"))

    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(64)

    def handle(conn, peer):
        conn.settimeout(120)
        name = "%s:%d" % peer[:2]
        received = b""
        total = 0
        try:
            if args.banner:
                conn.sendall(args.banner.encode() + b"\r\n")
            while True:
                data = conn.recv(65536)
                if not data:
                    if args.silent:
                        record(event="closed", peer=name, received=total)
                    return
                total += len(data)
                if args.silent:
                    continue
                record(event="data", peer=name, data=data.decode("latin-1"))
                received += data
                if args.http and b"\r\n\r\n" in received:
                    body = args.body.encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    received = b""
        except OSError:
            return
        finally:
            conn.close()

    print("ready", flush=True)
    while True:
        conn, peer = srv.accept()
        record(event="accept", peer="%s:%d" % peer[:2])
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()

if __name__ == "__main__":
    main()
