#!/usr/bin/env python3
"""The demo's "internet" API: an HTTPS server that checks the bearer token it receives.

GET /whoami answers 200 when the Authorization header carries the real token (given in
the DEMO_API_TOKEN environment variable of *this* server), 401 otherwise. It never echoes
what it received; every request is appended to --log as one JSON line saying whether the
token was the real value, a placeholder, or missing.
"""
import argparse, http.server, json, os, ssl, threading

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    real = os.environ["DEMO_API_TOKEN"]
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.answer()

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.answer()

        def answer(self):
            auth = self.headers.get("Authorization") or ""
            if auth == "Bearer " + real:
                token, status, text = "real", 200, "hello from %s: the token is valid\n" % args.name
            elif "$MSB_" in auth:
                token, status, text = "placeholder", 401, "%s: that is a placeholder, not a token\n" % args.name
            else:
                token, status, text = ("other" if auth else "missing"), 401, "%s: no valid token\n" % args.name
            with lock, open(args.log, "a") as f:
                f.write(json.dumps({"host": args.name, "path": self.path, "token": token}) + "\n")
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer((args.bind, 443), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()

if __name__ == "__main__":
    main()
