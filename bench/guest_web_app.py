"""A small web app the share tests run inside a guest (python3's stdlib only).

``python3 guest_web_app.py PORT``:

- ``GET /hello``: ``hello from <hostname>``
- ``GET /headers``: the request's headers, as JSON (what reached the guest)
- ``GET /bytes/N``: N bytes (``i % 251`` for byte i), chunked, written in pieces
- ``POST /sum``: the SHA-256 and length of the body (chunked or Content-Length)
- ``GET /ws`` with a WebSocket upgrade: echoes every message (RFC 6455, hand-rolled:
  the guest has no WebSocket library), with the ``Sec-WebSocket-Protocol`` chosen
  as the first one offered
"""

import base64
import hashlib
import json
import socket
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATTERN = bytes(i % 251 for i in range(251 * 1024))
WS_MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body in one write, flushed at the end of each request: written
    # apart (the default), a small answer waits out the client's delayed ACK (40 ms).
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def send_small(self, status, body, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket" and self.path.startswith("/ws"):
            return self.websocket()
        if self.path.startswith("/hello"):
            return self.send_small(200, f"hello from {socket.gethostname()}".encode())
        if self.path.startswith("/headers"):
            return self.send_small(200, json.dumps(dict(self.headers.items())).encode(), "application/json")
        if self.path.startswith("/bytes/"):
            left = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while left:
                piece = PATTERN[: min(left, len(PATTERN))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                left -= len(piece)
            self.wfile.write(b"0\r\n\r\n")
            return None
        return self.send_small(404, b"not here")

    def do_POST(self):
        digest, total = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data = self.rfile.read(size)
                self.rfile.readline()
                digest.update(data)
                total += len(data)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 16))
                digest.update(data)
                total += len(data)
                left -= len(data)
        body = json.dumps({"sha256": digest.hexdigest(), "length": total}).encode()
        return self.send_small(200, body, "application/json")

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1(self.headers["Sec-WebSocket-Key"].encode() + WS_MAGIC).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        if offered:
            self.send_header("Sec-WebSocket-Protocol", offered[0])
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self.rfile.read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self.rfile.read(8))
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 0x8:  # close: answer it and end
                self.frame(0x8, payload[:2])
                return
            if opcode == 0x9:  # ping
                self.frame(0xA, payload)
            elif opcode in (0x1, 0x2):
                self.frame(opcode, payload)

    def frame(self, opcode, payload):
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        self.wfile.write(head + payload)
        self.wfile.flush()


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), App).serve_forever()
