#!/usr/bin/python3
"""gRPC over TLS with Debian's python3-grpcio, no generated code (methods take and return
raw bytes).

server: --bind --port --cert --key --log. Methods of service keyhole.Test:
  Unary         logs the call's metadata (one JSON line) and answers b"unary:" + the token
                the call's authorization metadata carried
  Stream        (bidirectional) answers each message with b"echo:" + message, then logs
client: --target HOST:PORT --cafile --token; calls Unary once and Stream with three
  messages, printing each answer on a line ("unary <bytes>", "stream <bytes>"), or the
  gRPC status code and details if a call fails ("error <code> <details>").
"""
import argparse, json, sys
from concurrent import futures

import grpc

def server(args):
    log = open(args.log, "a")
    def record(context, kind):
        metadata = {k: v for k, v in context.invocation_metadata()}
        log.write(json.dumps({"kind": kind, "metadata": metadata}) + "\n")
        log.flush()
        auth = metadata.get("authorization", "")
        return auth.split(" ", 1)[1] if " " in auth else auth
    def unary(request, context):
        return b"unary:" + record(context, "unary").encode()
    def stream(requests, context):
        record(context, "stream")
        for message in requests:
            yield b"echo:" + message
    handler = grpc.method_handlers_generic_handler("keyhole.Test", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials([(open(args.key, "rb").read(), open(args.cert, "rb").read())])
    server.add_secure_port("%s:%d" % (args.bind, args.port), credentials)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()

def client(args):
    credentials = grpc.ssl_channel_credentials(root_certificates=open(args.cafile, "rb").read())
    channel = grpc.secure_channel(args.target, credentials)
    metadata = [("authorization", "Bearer " + args.token)]
    try:
        answer = channel.unary_unary("/keyhole.Test/Unary")(b"hello", metadata=metadata, timeout=10)
        print("unary", answer.decode(), flush=True)
        answers = channel.stream_stream("/keyhole.Test/Stream")(iter([b"one", b"two", b"three"]), metadata=metadata, timeout=10)
        for answer in answers:
            print("stream", answer.decode(), flush=True)
    except grpc.RpcError as error:
        print("error", error.code().name, error.details(), flush=True)

def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--bind")
    p.add_argument("--port", type=int, default=443)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--log")
    p.add_argument("--target")
    p.add_argument("--cafile")
    p.add_argument("--token", default="")
    args = p.parse_args()
    server(args) if args.mode == "server" else client(args)

if __name__ == "__main__":
    main()
