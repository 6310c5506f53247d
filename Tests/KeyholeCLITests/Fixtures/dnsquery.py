#!/usr/bin/env python3
"""Asks one DNS server directly (the guest picking its own resolver; dig is not installed).

Sends one query (A by default) over UDP, or over TCP with --tcp, to --server port 53 and
prints every address in the answer section, one a line. Exit status: 0 with at least one
address, 1 when the answer has none (its rcode is printed), 2 when nothing came back.
"""
import argparse, random, socket, struct, sys

TYPES = {"A": 1, "AAAA": 28}

def query(name, qtype):
    ident = random.randrange(1 << 16)
    header = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0)  # RD set, one question
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".")) + b"\x00"
    return ident, header + qname + struct.pack(">HH", TYPES[qtype], 1)

def skip_name(msg, i):
    while True:
        n = msg[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n

def parse(msg, ident):
    rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", msg[:12])
    if rid != ident:
        raise ValueError("answer id %d does not match query id %d" % (rid, ident))
    i = 12
    for _ in range(qd):
        i = skip_name(msg, i) + 4
    addresses = []
    for _ in range(an):
        i = skip_name(msg, i)
        rtype, _, _, length = struct.unpack(">HHIH", msg[i:i + 10])
        i += 10
        data = msg[i:i + length]
        i += length
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntop(socket.AF_INET, data))
        elif rtype == 28 and length == 16:
            addresses.append(socket.inet_ntop(socket.AF_INET6, data))
    return flags & 0x000F, addresses

def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(data), n))
        data += chunk
    return data

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--name", required=True)
    p.add_argument("--type", default="A", choices=sorted(TYPES))
    p.add_argument("--tcp", action="store_true")
    p.add_argument("--timeout", type=float, default=3)
    args = p.parse_args()
    family = socket.AF_INET6 if ":" in args.server else socket.AF_INET
    ident, msg = query(args.name, args.type)
    try:
        if args.tcp:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(args.timeout)
            s.connect((args.server, args.port))
            s.sendall(struct.pack(">H", len(msg)) + msg)
            (length,) = struct.unpack(">H", recv_exact(s, 2))
            answer = recv_exact(s, length)
        else:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(args.timeout)
            s.sendto(msg, (args.server, args.port))
            while True:
                answer, _ = s.recvfrom(65535)
                if answer[:2] == msg[:2]:
                    break
    except (OSError, ConnectionError) as error:
        print("no answer: %s" % error, file=sys.stderr)
        sys.exit(2)
    rcode, addresses = parse(answer, ident)
    for address in addresses:
        print(address)
    if not addresses:
        print("rcode %d, no addresses" % rcode, file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
