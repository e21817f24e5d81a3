"""Network probes run inside a guest (python3 from its image), one JSON result each.

Each probe reports ``ok`` (with what came back) or how it failed:
``refused`` (a TCP reset, or an ICMP port-unreachable), ``unreachable`` (an
ICMP host/admin-prohibited error, or no route), ``reset`` (reset after
connecting), ``timeout`` (nothing came back: a silent drop, which Kiln's
rules must never cause), ``dns-nxdomain`` ... Timeouts are generous bounds,
not measurements.
"""

from __future__ import annotations

import json
from typing import Any

from net_fixtures import NetVm

PROBE_SCRIPT = r'''
import errno, json, os, socket, ssl, struct, sys, time

TIMEOUT = 8

def failure(error):
    if isinstance(error, socket.timeout):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError):
        return "reset"
    if isinstance(error, ssl.SSLError):
        return "tls-" + (error.reason or "error")
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if isinstance(error, OSError) and error.errno == errno.ECONNRESET:
        return "reset"
    return type(error).__name__ + ":" + str(error)

def tcp(host, port, send=b"ping\n", family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((host, port))
        s.sendall(send)
        data = s.recv(4096)
        return "ok", data.decode(errors="replace")
    except Exception as e:
        return failure(e), ""
    finally:
        s.close()

def udp(host, port, payload=b"hello"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((host, port))
        s.send(payload)
        return "ok", s.recv(4096).decode(errors="replace")
    except Exception as e:
        return failure(e), ""
    finally:
        s.close()

def dns_query(name):
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode()
    return query + b"\x00" + struct.pack("!HH", 1, 1)

def dns_udp(server, name):
    status, _ = "", ""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((server, 53))
        s.send(dns_query(name))
        reply = s.recv(4096)
        return "ok", "rcode=%d answers=%d" % (reply[3] & 15, struct.unpack("!H", reply[6:8])[0])
    except Exception as e:
        return failure(e), ""
    finally:
        s.close()

def dns_tcp(server, name, port=53):
    query = dns_query(name)
    return tcp(server, port, struct.pack("!H", len(query)) + query)

def icmp(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(TIMEOUT)
    body = struct.pack("!BBHHH", 8, 0, 0, 0x4b49, 1) + b"kiln-probe"
    total = sum(struct.unpack("!%dH" % (len(body) // 2), body))
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    body = body[:2] + struct.pack("!H", checksum) + body[4:]
    try:
        s.sendto(body, (host, 0))
        while True:
            packet, peer = s.recvfrom(4096)
            kind, code = packet[20], packet[21]
            if kind == 0 and peer[0] == host:
                return "ok", "echo-reply"
            if kind == 3:
                return "unreachable", "icmp type 3 code %d from %s" % (code, peer[0])
    except Exception as e:
        return failure(e), ""
    finally:
        s.close()

def resolve(name):
    try:
        return "ok", sorted({a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET)})
    except socket.gaierror as e:
        return "dns-" + ("nxdomain" if e.errno == socket.EAI_NONAME else str(e.errno)), []

def tls(host, port, server_name, send, chunk=None):
    """A TLS connection naming server_name; chunk: send the ClientHello in pieces of that size."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        raw.connect((host, port))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        conn = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
        while True:
            try:
                conn.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    pieces = [pending[i:i + chunk] for i in range(0, len(pending), chunk)] if chunk else [pending]
                    for piece in pieces:
                        raw.sendall(piece)
                        if chunk:
                            time.sleep(0.05)
                    chunk = None
                data = raw.recv(65536)
                if not data:
                    return "closed", ""
                incoming.write(data)
        conn.write(send)
        raw.sendall(outgoing.read())
        reply = b""
        while True:
            try:
                reply += conn.read(65536)
                if reply.endswith(b"\n"):
                    break
            except ssl.SSLWantReadError:
                data = raw.recv(65536)
                if not data:
                    break
                incoming.write(data)
            except ssl.SSLZeroReturnError:
                break
        return "ok", reply.decode(errors="replace")
    except Exception as e:
        return failure(e), ""
    finally:
        raw.close()

PROBES = {"tcp": tcp, "udp": udp, "dns_udp": dns_udp, "dns_tcp": dns_tcp, "icmp": icmp, "resolve": resolve, "tls": tls}
results = []
for name, args in json.loads(sys.stdin.readline()):
    if "send" in args:
        args["send"] = args["send"].encode()
    if args.pop("v6", False):
        args["family"] = socket.AF_INET6
    started = time.monotonic()
    status, detail = PROBES[name](**args)
    results.append({"probe": name, "status": status, "detail": detail, "seconds": round(time.monotonic() - started, 3)})
print(json.dumps(results))
'''


def probe_script(*probes: tuple[str, dict[str, Any]]) -> str:
    """A python program that runs ``probes`` (name, arguments) and prints their results as JSON."""
    return PROBE_SCRIPT.replace(
        "json.loads(sys.stdin.readline())", repr(json.dumps(list(probes))).join(("json.loads(", ")"))
    )


async def probe(vm: NetVm, *probes: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``probes`` (name, arguments) in the guest; their results in order."""
    ran = await vm.python(probe_script(*probes), timeout=120)
    assert ran.exit_code == 0, ran
    results: list[dict[str, Any]] = json.loads(ran.stdout)
    return results


def statuses(results: list[dict[str, Any]]) -> list[str]:
    return [r["status"] for r in results]
