"""mitmproxy addon for bench/run: the same job Keyhole does, as small as mitmproxy allows.

- Header: "$MSB_TOKEN" in Authorization becomes the real value (KHB_REAL_TOKEN). Done in
  `requestheaders`, because a streamed request's headers are sent before `request` runs.
- Body (only for paths starting with /upload-inject, workload (d)): the request body is
  streamed through a replacer that carries a tail across chunks, so a placeholder split
  between two reads is still found. Other large bodies are streamed untouched
  (--set stream_large_bodies=1m).
"""
import os

PLACEHOLDER = b"$MSB_TOKEN"
REAL = os.environ["KHB_REAL_TOKEN"].encode()


class StreamReplacer:
    def __init__(self):
        self.carry = b""

    def __call__(self, data: bytes) -> bytes:
        if not data:  # end of the body: flush what was held back
            out, self.carry = self.carry, b""
            return out
        buf = self.carry + data
        safe = len(buf) - (len(PLACEHOLDER) - 1)  # a match starting here or later may be partial
        out = []
        i = 0
        while True:
            j = buf.find(PLACEHOLDER, i)
            if j < 0 or j >= safe:
                break
            out.append(buf[i:j])
            out.append(REAL)
            i = j + len(PLACEHOLDER)
        end = max(i, safe)
        out.append(buf[i:end])
        self.carry = buf[end:]
        return b"".join(out)


def requestheaders(flow):
    value = flow.request.headers.get("authorization")
    if value and "$MSB_TOKEN" in value:
        flow.request.headers["authorization"] = value.replace("$MSB_TOKEN", REAL.decode())
    if flow.request.path.startswith("/upload-inject"):
        flow.request.stream = StreamReplacer()
