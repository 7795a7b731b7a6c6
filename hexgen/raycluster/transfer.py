"""A short TCP exchange between two probe actors: ping round trips for latency, one bulk send for bandwidth.

The listening side accepts one connection, answers pings and counts bulk bytes; it decodes nothing else."""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time

PINGS = 20
ACCEPT_TIMEOUT_S = 30.0


def listen(host: str) -> int:
    """Start a one-connection echo/sink server on host; returns its port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(1)
    server.settimeout(ACCEPT_TIMEOUT_S)
    threading.Thread(target=_serve_one, args=(server,), daemon=True).start()
    return server.getsockname()[1]


def _serve_one(server: socket.socket) -> None:
    try:
        conn, _ = server.accept()
    except OSError:
        return
    finally:
        server.close()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            kind = conn.recv(1)
            if kind == b"P":
                conn.sendall(b"P")
            elif kind == b"B":
                remaining = struct.unpack("!Q", _read_exact(conn, 8))[0]
                while remaining:
                    chunk = conn.recv(min(remaining, 1 << 20))
                    if not chunk:
                        return
                    remaining -= len(chunk)
                conn.sendall(b"K")
            else:
                return


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def measure(host: str, port: int, bulk_bytes: int) -> tuple[float, float]:
    """(one-way latency in ms, bandwidth in Gbit/s) to a listener."""
    with socket.create_connection((host, port), timeout=ACCEPT_TIMEOUT_S) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        round_trips = []
        for _ in range(PINGS):
            start = time.perf_counter()
            conn.sendall(b"P")
            _read_exact(conn, 1)
            round_trips.append(time.perf_counter() - start)
        payload = bytes(bulk_bytes)
        start = time.perf_counter()
        conn.sendall(b"B" + struct.pack("!Q", bulk_bytes))
        conn.sendall(payload)
        _read_exact(conn, 1)
        seconds = time.perf_counter() - start
        conn.sendall(b"Q")
    return statistics.median(round_trips) / 2 * 1e3, bulk_bytes * 8 / seconds / 1e9
