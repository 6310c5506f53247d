#!/usr/bin/python3
"""A test upstream that speaks HTTP/2 over TLS (ALPN h2, or h2 and http/1.1 with --h1),
built on the h2 library (Debian's python3-h2). Each request becomes one JSON line in --log:
method, path, authority, headers (a list of [name, value], lowercase), body, and the
protocol ("h2"). Answers 200 "ok\n" with a trailer `x-done: yes`, except:
  /reflect  hands the request's Authorization token back in a header (x-token), in the
            body (JSON) and in a trailer (x-token-trailer)
  /echo     sends the request body back
With --h1, a client that chose http/1.1 gets one HTTP/1.1 answer "h1\n" per connection.
"""
import argparse, json, socket, ssl, sys, threading

import h2.config, h2.connection, h2.events

def serve_h1(conn, args):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    with open(args.log, "a") as f:
        f.write(json.dumps({"protocol": "http/1.1", "head": data.split(b"\r\n\r\n")[0].decode("latin-1")}) + "\n")
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nh1\n")

def serve(conn, args):
    if conn.selected_alpn_protocol() != "h2":
        return serve_h1(conn, args)
    h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    h2c.initiate_connection()
    conn.sendall(h2c.data_to_send())
    streams = {}
    while True:
        data = conn.recv(65536)
        if not data:
            return
        for event in h2c.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                streams[event.stream_id] = {"headers": event.headers, "body": b""}
            elif isinstance(event, h2.events.DataReceived):
                streams[event.stream_id]["body"] += event.data
                h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                answer(h2c, event.stream_id, streams.pop(event.stream_id), args)
            elif isinstance(event, h2.events.StreamReset):
                streams.pop(event.stream_id, None)
        out = h2c.data_to_send()
        if out:
            conn.sendall(out)

def answer(h2c, stream_id, request, args):
    headers = {}
    pseudo = {}
    for name, value in request["headers"]:
        if name.startswith(":"):
            pseudo[name] = value
        else:
            headers[name] = headers[name] + ", " + value if name in headers else value
    body = request["body"]
    with open(args.log, "a") as f:
        f.write(json.dumps({"protocol": "h2", "method": pseudo.get(":method"), "path": pseudo.get(":path"),
                            "authority": pseudo.get(":authority"),
                            "headers": [[n, v] for n, v in request["headers"] if not n.startswith(":")],
                            "body": body.decode("utf-8", "replace")}) + "\n")
    path = pseudo.get(":path", "")
    auth = headers.get("authorization", "")
    token = auth.split(" ", 1)[1] if " " in auth else auth
    extra, trailers = [], [("x-done", "yes")]
    if path.startswith("/reflect"):
        out = json.dumps({"token": token}).encode()
        extra = [("x-token", token)]
        trailers.append(("x-token-trailer", token))
    elif path.startswith("/echo"):
        out = body
    else:
        out = b"ok\n"
    h2c.send_headers(stream_id, [(":status", "200"), ("content-type", "text/plain"), ("content-length", str(len(out)))] + extra)
    # In pieces of 7 bytes: values split across DATA frames.
    for i in range(0, len(out), 7):
        h2c.send_data(stream_id, out[i:i + 7])
    h2c.send_headers(stream_id, trailers, end_stream=True)

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, default=443)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--h1", action="store_true")
    args = p.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["h2", "http/1.1"] if args.h1 else ["h2"])
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.bind, args.port))
    server.listen(64)
    print("ready", flush=True)
    while True:
        raw, _ = server.accept()
        def run(raw=raw):
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    serve(conn, args)
            except Exception as error:  # a test's client may vanish mid-stream
                print("connection ended:", error, file=sys.stderr, flush=True)
        threading.Thread(target=run, daemon=True).start()

if __name__ == "__main__":
    main()
