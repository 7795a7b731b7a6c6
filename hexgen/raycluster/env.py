"""The settings every hexgen Ray process runs with, machine resources, and connecting to a cluster within seconds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from hexgen.errors import UserError

MACHINE_RESOURCE_PREFIX = "hexgen-machine:"
CONNECT_TIMEOUT_S = 10.0
# Usage statistics off and never posted anywhere but a closed loopback port; node loss noticed in ~3 s.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


# An HTTP/2 client's first bytes (preface, empty SETTINGS frame); a gRPC server answers with a SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = bytes([4])


class RayUnavailable(UserError):
    """The Ray cluster cannot be reached or refused the connection."""


def machine_resource(machine: str) -> str:
    """The Ray custom resource a node of `machine` offers once per slot (GPU, or CPU worker without GPUs)."""
    return MACHINE_RESOURCE_PREFIX + machine


def split_address(address: str, named: str = "--ray") -> tuple[str, int]:
    """HOST:PORT -> (host, port); otherwise a one-line error naming the address as the user gave it (`named`)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{named} {address!r}: expected HEAD_HOST:PORT, e.g. 10.0.0.5:6379")
    return host, int(port)


def token_file() -> Path:
    """Where Ray looks for its token when RAY_AUTH_TOKEN is not set (the head writes it there)."""
    return Path.home() / ".ray" / "auth_token"


def cluster_token() -> str:
    """The cluster's token: RAY_AUTH_TOKEN, else Ray's token file (on the head); a one-line error if neither."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and token_file().is_file():
        token = token_file().read_text().strip()
    if not token:
        raise UserError("the Ray cluster uses token authentication: set RAY_AUTH_TOKEN to the token that "
                        "`hexgen node start --head` printed")
    return token


def auth_env() -> dict[str, str]:
    """Ray's token authentication, always: Ray's processes listen on every interface, loopback node IP or not."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster_token()}


def check_head(address: str, named: str = "--ray") -> None:
    """RayUnavailable within CONNECT_TIMEOUT_S unless something that speaks gRPC answers at HOST:PORT (Ray itself
    would retry for minutes)."""
    host, port = split_address(address, named)
    hint = "start it with `hexgen node start --head` and check the address"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S / 2) as sock:
            sock.settimeout(CONNECT_TIMEOUT_S / 2)
            sock.sendall(HTTP2_PREFACE)
            speaks_grpc = sock.recv(9)[3:4] == HTTP2_SETTINGS
    except OSError as err:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); {hint}") from None
    if not speaks_grpc:
        raise RayUnavailable(f"{address} answers, but not as a Ray head (no gRPC); {hint}")


def connect(address: str) -> None:
    """ray.init() as a driver of the cluster at HOST:PORT; RayUnavailable within seconds if it cannot."""
    check_head(address)
    os.environ.update({**RAY_ENV, **auth_env()})
    # One attempt at the GCS (it answered gRPC above): a refused token then fails in seconds, not after 20 retries.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError) as err:
        raise RayUnavailable(f"cannot join the Ray cluster at {address}: {str(err).splitlines()[0]} "
                             "(is RAY_AUTH_TOKEN the head's token?)") from None


def machine_slots() -> dict[str, float]:
    """Machine name -> slots over the live nodes of the connected cluster."""
    return {name: slots for name, (slots, _) in _machines().items()}


def machine_threads() -> dict[str, int]:
    """Machine name -> torch threads for each CPU rank: the machine's cores shared by its slots."""
    return {name: max(1, int(cpus // max(slots, 1))) for name, (slots, cpus) in _machines().items()}


def _machines() -> dict[str, tuple[float, float]]:
    """Machine name -> (slots, CPU cores) over the live nodes of the connected cluster."""
    import ray

    totals: dict[str, tuple[float, float]] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            for key, amount in resources.items():
                if key.startswith(MACHINE_RESOURCE_PREFIX):
                    slots, cpus = totals.get(key.removeprefix(MACHINE_RESOURCE_PREFIX), (0.0, 0.0))
                    totals[key.removeprefix(MACHINE_RESOURCE_PREFIX)] = (slots + amount,
                                                                         cpus + resources.get("CPU", 0.0))
    return totals


def local_gpu_index(ray_gpu_ids: list, visible_devices: str | None) -> int:
    """The CUDA device index, in this process, of the first GPU Ray assigned to it. Ray normally shows an actor
    only its own GPUs (CUDA_VISIBLE_DEVICES set to their ids: device 0); where a node keeps its whole list
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1) the GPU's place in that list, or its id when none is set."""
    if not ray_gpu_ids:
        return 0
    gpu = str(ray_gpu_ids[0])
    if visible_devices:
        listed = [d.strip() for d in visible_devices.split(",")]
        if gpu in listed:
            return listed.index(gpu)
    return int(gpu) if gpu.isdigit() else 0
