"""Start, join and stop this machine's Ray node as `ray start --block` in a session of its own. Ray's daemons stay
in that process group; its workers start sessions of their own but inherit a marker variable naming the node; so
`stop` ends exactly the processes of the nodes it started."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hexgen.errors import UserError
from hexgen.folders import make_folder
from hexgen.raycluster.env import RAY_ENV, cluster_token, machine_resource, token_file

START_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
STARTED_LINE = "Ray runtime started"
NODE_MARKER = "HEXGEN_NODE_ID"


@dataclass(frozen=True)
class NodeRecord:
    """What `hexgen node stop` needs to find a node it started."""

    machine: str
    pid: int  # of `ray start --block`
    marker: str  # value of NODE_MARKER in the environment of every process of the node
    node_ip: str
    head_address: str
    log_path: str


def state_dir() -> Path:
    root = os.environ.get("HEXGEN_STATE_DIR") or Path.home() / ".cache" / "hexgen"
    return make_folder(Path(root) / "nodes", "the folder of node records", "HEXGEN_STATE_DIR")


def _ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_node(machine: str, slots: int, node_ip: str, head_address: str | None, port: int) -> tuple[NodeRecord, str]:
    """Start a head (head_address None) or join one, with token authentication; returns the record and the token."""
    record_path = state_dir() / f"{machine}.json"
    if record_path.exists() and node_pids(NodeRecord(**json.loads(record_path.read_text()))):
        raise UserError(f"a node for machine {machine!r} is already running here; `hexgen node stop --machine "
                        f"{machine}` first")
    marker = uuid.uuid4().hex
    env = {**os.environ, **RAY_ENV, NODE_MARKER: marker}
    cmd = [_ray_executable(), "start", "--block", "--disable-usage-stats"]
    if node_ip:
        cmd += ["--node-ip-address", node_ip]
    if slots:
        cmd += ["--resources", json.dumps({machine_resource(machine): slots})]
    token = cluster_token() if head_address else _head_token()
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    if head_address is None:
        cmd += ["--head", "--port", str(port), "--include-dashboard=false"]
        _write_bootstrap_config()
    else:  # the head answered gRPC already: one attempt, so a refused token fails in seconds
        cmd += ["--address", head_address]
        env.setdefault("RAY_gcs_server_port_wait_time_s", "1")
    log_path = state_dir() / f"{machine}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    # Recorded before the wait (up to START_TIMEOUT_S): a start cut short by Ctrl-C or SIGTERM stops what it
    # started, and one killed outright leaves a record that `hexgen node stop` finds.
    record = NodeRecord(machine, proc.pid, marker, node_ip, head_address or "", str(log_path))
    _save(record, record_path)
    try:
        with _sigterm_interrupts():
            _wait_started(proc, log_path)
    except BaseException:
        stop_nodes_of([record])
        record_path.unlink(missing_ok=True)
        raise
    record = replace(record, head_address=head_address or f"{node_ip or _local_ip(log_path)}:{port}")
    _save(record, record_path)
    return record, token


def _save(record: NodeRecord, path: Path) -> None:
    path.write_text(json.dumps(asdict(record)))
    path.chmod(0o600)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, as Ctrl-C does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _head_token() -> str:
    """The token of a new cluster: RAY_AUTH_TOKEN, else Ray's token file here, else a new random one saved there."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip() or token_file().is_file():
        return cluster_token()
    token = secrets.token_hex(32)
    token_file().parent.mkdir(parents=True, exist_ok=True)
    token_file().write_text(token)
    token_file().chmod(0o600)
    return token


def _write_bootstrap_config() -> None:
    """An empty bootstrap config stops the head's usage module from probing cloud metadata addresses."""
    path = Path.home() / "ray_bootstrap_config.yaml"
    if not path.exists():
        path.write_text("{}\n")


def _wait_started(proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while STARTED_LINE not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "no output")
            raise UserError(f"ray start failed: {why.strip()} (full log: {log_path})")
        time.sleep(0.2)


def _local_ip(log_path: Path) -> str:
    """The node IP Ray chose, from its start-up output."""
    for line in log_path.read_text().splitlines():
        if "Local node IP:" in line:
            return line.split("Local node IP:")[1].strip()
    return "127.0.0.1"


def stop_nodes(machine: str | None) -> list[str]:
    """Stop the nodes this machine started (all, or the one of `machine`); returns the machines stopped."""
    paths = [p for p in sorted(state_dir().glob("*.json")) if machine in (None, p.stem)]
    records = [NodeRecord(**json.loads(p.read_text())) for p in paths]
    stop_nodes_of(records)
    for path in paths:
        path.unlink()
    return [r.machine for r in records]


def stop_nodes_of(records: list[NodeRecord], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each `ray start` (Ray's own orderly shutdown) at once, then SIGKILL every process still there."""
    leaders = [r.pid for r in records if r.pid in node_pids(r)]
    for pid in leaders:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(r.pid in node_pids(r) for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
    for record in records:
        for pid in node_pids(record):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def node_pids(record: NodeRecord) -> list[int]:
    """Live (not zombie) processes of the node: with its marker in their environment, or Ray processes in its
    process group (Ray's agents do not keep the environment)."""
    wanted = f"{NODE_MARKER}={record.marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, _, pgid = stat[stat.rindex(")") + 2:].split()[:3]
            if state == "Z":
                continue
            in_group = int(pgid) == record.pid and b"ray" in (entry / "cmdline").read_bytes()
            if in_group or wanted in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def read_record(machine: str) -> NodeRecord:
    return NodeRecord(**json.loads((state_dir() / f"{machine}.json").read_text()))
