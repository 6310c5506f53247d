#!/usr/bin/env python3
"""A guest client that sends exact bytes: raw HTTP/1.1 requests, over TLS or plain TCP.

Each --request (hex-encoded, so that placeholders and odd headers pass any shell) is sent
on the same connection, one after the other; after each, one response is read (its head
and a Content-Length body). Prints one line per request: "response <status line>", or
why the exchange ended: "reset", "closed", "ssl-error ...", "timeout", "error ...".
--sni sets the TLS server name; --cafile verifies the chain (not the name: the name may be
an invalid host name on purpose) against it, --insecure verifies nothing.
"""
import argparse, socket, ssl, sys

def read_response(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return lines[0], body

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--sni")
    p.add_argument("--cafile")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--request", action="append", default=[], help="hex-encoded bytes of one request")
    p.add_argument("--timeout", type=float, default=8)
    args = p.parse_args()
    try:
        sock = socket.create_connection((args.ip, args.port), timeout=args.timeout)
        if args.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            if args.insecure:
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx.load_verify_locations(args.cafile)
            ctx.set_alpn_protocols(["http/1.1"])
            sock = ctx.wrap_socket(sock, server_hostname=args.sni)
        for request in args.request:
            sock.sendall(bytes.fromhex(request))
            status, body = read_response(sock)
            if status is None:
                print("closed", flush=True)
                return
            print("response %s %s" % (status, body.decode("latin-1").strip()), flush=True)
    except ConnectionResetError:
        print("reset", flush=True)
    except BrokenPipeError:
        print("reset", flush=True)
    except ssl.SSLError as error:
        print("ssl-error %s" % error, flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    except OSError as error:
        print("error %s" % error, flush=True)

if __name__ == "__main__":
    main()
