#!/usr/bin/env python3
"""A real Apache Kafka broker on loopback, for the demo, the tests and the benchmarks.

    python scripts/kafka_local.py fetch [--version V]   # broker jars from Maven Central, cached outside git
    python scripts/kafka_local.py start --dir D [--port P] [--controller-port C] [--keep-data]
                                                        # KRaft single node; last stdout line: 127.0.0.1:P
    python scripts/kafka_local.py stop --dir D          # SIGTERM, SIGKILL after a timeout; safe to repeat
    python scripts/kafka_local.py restart --dir D       # stop, then start again with its data and ports
    python scripts/kafka_local.py status --dir D        # exit 0 when it serves, 1 when not

Where the broker comes from: Maven fetches `org.apache.kafka:kafka_2.13` (the broker, by package
name) with all its runtime dependencies, plus a log4j2 binding for slf4j, into
`${XDG_CACHE_HOME:-~/.cache}/claude-gateway/kafka/<version>/libs`. A marker file written last makes
a second `fetch` a no-op; a file lock makes concurrent fetches safe. Needs `java` (17+) and `mvn`
(Debian: `apt-get install -y openjdk-17-jre-headless maven`); without them it exits 2 saying so.

Which Kafka: 4.4.0, the newest 4.x on Maven Central when this was written. aiokafka 0.14 produces,
consumes with consumer groups, commits offsets, runs idempotent producers and transactions against
it (tests/test_kafka_local.py); Kafka 4's removal of old protocol versions (KIP-896) does not bite
it. `--version` (or GATEWAY_KAFKA_VERSION) picks another release (3.9.1 was checked to work too).

What `start` runs: one JVM (`kafka.Kafka`, G1, -Xmx512m unless `heap` says otherwise) acting as
broker and KRaft controller (node.id=1), listening on 127.0.0.1 only, with a fresh random cluster
id and a fresh data directory under DIR (by default the broker is disposable: a start wipes DIR's
data). With `--keep-data` (`start(..., keep_data=True)`), or with `restart`, a DIR that holds a
formatted broker is started again as it was: same cluster id, topics, records, committed offsets
and transactions, and the same client and controller ports (read back from `server.properties`), so
clients reconnect to the bootstrap they had; a DIR without one is started fresh. Replication
factors are 1, the first consumer-group rebalance has no delay, topics are auto-created with 3
partitions. It waits until the broker answers a real Kafka ApiVersions + Metadata round trip
listing itself. Files in DIR: `server.properties`, `heap`, `data/` (log.dirs), `logs/server.log`
(log4j), `broker.out` (JVM stdout/err), `broker.pid`, `bootstrap`.

Importable (stdlib only, it runs before the venv exists): `fetch(version) -> Path` (libs dir),
`start(directory, port=0, controller_port=0, version=..., timeout_s=60, die_with_parent=False,
keep_data=False, heap=None) -> str` (the bootstrap address), `stop(directory, timeout_s=30)`,
`restart(directory, ...) -> str` (the same bootstrap), `status(directory) -> str | None`;
failures raise `KafkaLocalError` (`.exit_code` 2 for a missing java/mvn).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

DEFAULT_VERSION = "4.4.0"
KAFKA_VERSION = os.environ.get("GATEWAY_KAFKA_VERSION") or DEFAULT_VERSION
LOG4J_VERSION = "2.25.5"  # log4j-api, log4j-core and the slf4j 1.x binding, one version
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
HOST = "127.0.0.1"
HEAP = "512m"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
INSTALL_HINT = "apt-get install -y openjdk-17-jre-headless maven"

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by scripts/kafka_local.py: the Apache Kafka broker and a logging binding. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.claude-gateway</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId>
        <version>{plugin}</version>
      </plugin>
    </plugins>
  </build>
</project>
"""

# Quiet: warnings and errors, plus the broker's own start/stop lines, to a file.
_LOG4J2 = """status = error
name = kafka-local
shutdownHook = disable
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.raftserver.name = kafka.server.KafkaRaftServer
logger.raftserver.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
logger.controller.name = kafka.server.ControllerServer
logger.controller.level = INFO
"""

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Brokers started by this process: waited for on stop (no zombie, no ResourceWarning)."""


def _reap_exited() -> None:
    """Wait for (reap) the brokers started here that another process stopped: `restart` from
    the command line stops ours by its pid and starts its own, so `stop` never meets ours."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[pid]


class KafkaLocalError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why.

    `exit_code` is 2 for a missing tool (java, mvn), 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- fetch


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/claude-gateway/kafka/<version>`."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "claude-gateway" / "kafka" / version


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise KafkaLocalError(
            f"`{tool}` is not installed; the local Kafka broker needs java (17+) and mvn "
            f"(Debian: {INSTALL_HINT})",
            exit_code=2,
        )
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch(version: str = KAFKA_VERSION) -> Path:
    """Fetch the broker jars once (a no-op when the cache is complete); return the libs directory."""
    root = cache_dir(version)
    libs = root / "libs"
    marker = root / ".complete"
    if marker.exists():
        return libs
    _require("java")
    mvn = _require("mvn")
    with _locked(root.parent / f".{version}.lock"):
        if marker.exists():  # another process finished it while we waited
            return libs
        root.mkdir(parents=True, exist_ok=True)
        pom = root / "pom.xml"
        pom.write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION, plugin=DEPENDENCY_PLUGIN_VERSION))
        staging = root / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0 or not (staging / f"kafka_2.13-{version}.jar").exists():
            raise KafkaLocalError(
                f"Maven could not fetch org.apache.kafka:kafka_2.13:{version} from Maven Central "
                f"(`{' '.join(cmd)}` exited {result.returncode}):\n" + (result.stdout + result.stderr)[-3000:]
            )
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.write_text(f"{version}\n")  # last: the cache is complete
    return libs


# --------------------------------------------------------------------------- wire checks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _string(value: bytes) -> bytes:
    return struct.pack(">h", len(value)) + value


def _roundtrip(sock: socket.socket, api_key: int, api_version: int, correlation: int, body: bytes) -> bytes:
    """Send one request (header v1) and return the response body after its correlation id."""
    header = struct.pack(">hhi", api_key, api_version, correlation) + _string(b"kafka-local")
    request = header + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    payload = _recv_exact(sock, size)
    if struct.unpack(">i", payload[:4])[0] != correlation:
        raise OSError("correlation id mismatch")
    return payload[4:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return bytes(data)


def _serves(host: str, port: int) -> bool:
    """A real Kafka round trip: ApiVersions v0 without error, then Metadata v4 listing this broker."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.settimeout(5)
            body = _roundtrip(sock, 18, 0, 1, b"")
            error, count = struct.unpack(">hi", body[:6])
            if error != 0:
                return False
            ranges = {}
            for i in range(count):
                key, low, high = struct.unpack(">hhh", body[6 + 6 * i : 12 + 6 * i])
                ranges[key] = (low, high)
            low, high = ranges.get(3, (0, -1))
            if not low <= 4 <= high:  # no Metadata v4 on some future broker: ApiVersions must do
                return True
            # Metadata v4: no topics (empty array), no auto-creation.
            body = _roundtrip(sock, 3, 4, 2, struct.pack(">ib", 0, 0))
            offset = 4  # throttle_time_ms
            (brokers,) = struct.unpack(">i", body[offset : offset + 4])
            offset += 4
            for _ in range(brokers):
                offset += 4  # node_id
                (hlen,) = struct.unpack(">h", body[offset : offset + 2])
                offset += 2 + hlen
                (bport,) = struct.unpack(">i", body[offset : offset + 4])
                offset += 4
                (rlen,) = struct.unpack(">h", body[offset : offset + 2])
                offset += 2 + max(rlen, 0)
                if bport == port:
                    return True
            return False
    except (OSError, struct.error):
        return False


# --------------------------------------------------------------------------- process


def _is_broker(pid: int) -> bool:
    """The pid is alive (not a zombie) and runs kafka.Kafka: never signal a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and b"kafka.Kafka" in cmdline


def _read_pid(directory: Path) -> int | None:
    try:
        return int((directory / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _pid(directory: Path) -> int | None:
    pid = _read_pid(directory)
    return pid if pid is not None and _is_broker(pid) else None


def status(directory: str | Path) -> str | None:
    """The bootstrap address when the broker of `directory` is running and serving, else None."""
    d = Path(directory)
    pid = _pid(d)
    try:
        bootstrap = (d / "bootstrap").read_text().strip()
    except OSError:
        return None
    if pid is None or not bootstrap:
        return None
    host, _, port = bootstrap.rpartition(":")
    return bootstrap if _serves(host, int(port)) else None


def _tail(directory: Path, lines: int = 40) -> str:
    parts = []
    for path in (directory / "broker.out", directory / "logs" / "server.log"):
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts) or "(no broker log)"


def _cluster_id() -> str:
    """A random KRaft cluster id. Like Kafka's own `Uuid.randomUuid`, never one that starts
    with '-': the storage tool would read it as an option (1 start in 64 failed)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _server_properties(data: Path, port: int, controller_port: int) -> str:
    return "\n".join(
        [
            "# Written by scripts/kafka_local.py: a single-node KRaft broker on loopback.",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers={HOST}:{controller_port}",
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
            "inter.broker.listener.name=PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=3",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            "auto.create.topics.enable=true",
            "delete.topic.enable=true",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "num.network.threads=2",
            "num.io.threads=4",
            "log.retention.hours=4",
            "log.segment.bytes=67108864",
            "",
        ]
    )


def _formatted(d: Path) -> bool:
    """DIR holds a broker formatted by an earlier start (its data can be started again)."""
    return (d / "data" / "meta.properties").is_file() and (d / "server.properties").is_file()


def _ports(d: Path) -> tuple[int, int]:
    """The client and controller ports of the broker in DIR, from its `server.properties`."""
    ports: dict[str, int] = {}
    for line in (d / "server.properties").read_text().splitlines():
        if line.startswith("listeners="):
            for listener in line.partition("=")[2].split(","):
                name, _, address = listener.partition("://")
                ports[name] = int(address.rpartition(":")[2])
    if "PLAINTEXT" not in ports or "CONTROLLER" not in ports:
        raise KafkaLocalError(f"{d / 'server.properties'} names no PLAINTEXT and CONTROLLER listeners")
    return ports["PLAINTEXT"], ports["CONTROLLER"]


def start(
    directory: str | Path,
    port: int = 0,
    controller_port: int = 0,
    version: str = KAFKA_VERSION,
    timeout_s: float = START_TIMEOUT_S,
    die_with_parent: bool = False,
    keep_data: bool = False,
    heap: str | None = None,
) -> str:
    """Start a single-node KRaft broker with its files in `directory`; return `127.0.0.1:PORT`.

    Idempotent: when the broker of `directory` already serves, its bootstrap is returned.
    Port 0 picks a free port (and picks again if another process took it meanwhile).
    `keep_data`: when `directory` holds a formatted broker, start it again with its data and
    its ports (a `port` or `controller_port` that differs from those is refused); otherwise
    start fresh.
    `die_with_parent` (Linux): the broker gets SIGTERM when the calling process dies, even by
    SIGKILL, so a killed test run leaves no broker behind.
    `heap`: the JVM's -Xms/-Xmx (e.g. "2g"); by default the kept broker's (`restart`), else 512m.
    Raises KafkaLocalError (with the log tail) when it does not serve within `timeout_s`.
    """
    d = Path(directory).resolve()
    running = status(d)
    if running is not None:
        return running
    stop(d)  # a broker that runs but does not serve, or stale files
    libs = fetch(version)
    java = _require("java")
    if heap is None:
        kept = d / "heap"
        heap = kept.read_text().strip() if keep_data and kept.is_file() else HEAP
    if keep_data and _formatted(d):
        client, control = _ports(d)
        if port not in (0, client) or controller_port not in (0, control):
            raise KafkaLocalError(
                f"{d} holds a broker on ports {client}/{control}; its data cannot move to "
                f"{port or client}/{controller_port or control}"
            )
        return _launch(d, java, libs, client, control, timeout_s, die_with_parent, heap, keep_data=True)
    attempts = 3 if port == 0 or controller_port == 0 else 1
    for attempt in range(1, attempts + 1):
        client = port or _free_port()
        control = controller_port or _free_port()
        while control == client:
            control = _free_port()
        try:
            return _launch(d, java, libs, client, control, timeout_s, die_with_parent, heap)
        except KafkaLocalError as exc:
            if attempt == attempts or "Address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


def _parent_death_signal() -> None:
    """In the child before exec: SIGTERM me when my parent dies (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def restart(
    directory: str | Path,
    timeout_s: float = START_TIMEOUT_S,
    stop_timeout_s: float = STOP_TIMEOUT_S,
    die_with_parent: bool = False,
    version: str = KAFKA_VERSION,
) -> str:
    """Stop the broker of `directory` (SIGTERM: a clean shutdown) and start it again with its
    data and ports; return its bootstrap, the same as before. Raises KafkaLocalError when
    `directory` holds no formatted broker."""
    d = Path(directory).resolve()
    if not _formatted(d):
        raise KafkaLocalError(f"{d} holds no broker to restart (start one first)")
    stop(d, stop_timeout_s)
    return start(d, version=version, timeout_s=timeout_s, die_with_parent=die_with_parent, keep_data=True)


def _launch(
    d: Path,
    java: str,
    libs: Path,
    port: int,
    controller_port: int,
    timeout_s: float,
    die_with_parent: bool,
    heap: str,
    keep_data: bool = False,
    properties: str | None = None,
    format_args: Sequence[str] = (),
) -> str:
    """Start the broker of `d` and wait until it serves on `port` (its PLAINTEXT listener).
    `properties`: its server.properties (default `_server_properties`); `format_args`: more
    arguments of the storage format (`--add-scram ...`); tests/support/secure_kafka.py uses both."""
    data, logs = d / "data", d / "logs"
    for sub in (data, logs):
        if not keep_data:
            shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True, exist_ok=True)
    for name in ("bootstrap",) if keep_data else ("broker.out", "bootstrap"):
        (d / name).unlink(missing_ok=True)
    props = d / "server.properties"
    if properties is None:
        properties = _server_properties(data, port, controller_port)
    props.write_text(properties)
    (d / "heap").write_text(f"{heap}\n")
    log4j = d / "log4j2.properties"
    log4j.write_text(_LOG4J2)

    jvm_common = [
        f"-Dlog4j2.configurationFile={log4j}",
        f"-Dkafka.logs.dir={logs}",
        "-Djava.awt.headless=true",
        "-cp",
        f"{libs}/*",
    ]
    if not keep_data:
        _format(d, java, jvm_common, props, format_args)

    with (d / "broker.out").open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603
            [java, f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
             "-XX:+ExplicitGCInvokesConcurrent", *jvm_common, "kafka.Kafka", str(props)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=d,
            preexec_fn=_parent_death_signal if die_with_parent and sys.platform == "linux" else None,
        )  # fmt: skip
    _CHILDREN[proc.pid] = proc
    (d / "broker.pid").write_text(f"{proc.pid}\n")

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _CHILDREN.pop(proc.pid, None)
            (d / "broker.pid").unlink(missing_ok=True)
            raise KafkaLocalError(f"the Kafka broker exited with code {proc.returncode}:\n{_tail(d)}")
        if _serves(HOST, port):
            bootstrap = f"{HOST}:{port}"
            (d / "bootstrap").write_text(f"{bootstrap}\n")
            return bootstrap
        time.sleep(0.2)
    tail = _tail(d)
    stop(d)
    raise KafkaLocalError(f"the Kafka broker did not serve on {HOST}:{port} within {timeout_s:.0f}s:\n{tail}")


def _format(d: Path, java: str, jvm_common: list[str], props: Path, extra: Sequence[str] = ()) -> None:
    fmt = subprocess.run(  # noqa: S603
        [java, "-Xmx256m", "-XX:TieredStopAtLevel=1", *jvm_common, "kafka.tools.StorageTool",
         "format", "--cluster-id", _cluster_id(), "--config", str(props), "--standalone", *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if fmt.returncode != 0:
        raise KafkaLocalError(f"formatting the KRaft storage failed:\n{fmt.stdout}{fmt.stderr}\n{_tail(d)}")


def stop(directory: str | Path, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the broker of `directory`, wait, SIGKILL after `timeout_s`. Safe when not running."""
    d = Path(directory)
    _reap_exited()
    pid = _read_pid(d)
    child = _CHILDREN.pop(pid, None) if pid is not None else None
    if child is not None:  # started by this process: wait on it (reaps it, no zombie)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    elif pid is not None and _is_broker(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _is_broker(pid):
            time.sleep(0.1)
        if _is_broker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _is_broker(pid):
                time.sleep(0.05)
    for name in ("broker.pid", "bootstrap"):
        (d / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kafka_local.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="fetch the broker jars into the cache (no-op when complete)")
    p_fetch.add_argument("--version", default=KAFKA_VERSION, help="Kafka release (default %(default)s)")
    p_start = sub.add_parser("start", help="start a broker; prints the bootstrap address last")
    p_start.add_argument("--dir", required=True, type=Path)
    p_start.add_argument("--port", type=int, default=0, help="client port (default: a free one)")
    p_start.add_argument("--controller-port", type=int, default=0, help="KRaft port (default: a free one)")
    p_start.add_argument("--version", default=KAFKA_VERSION, help="Kafka release (default %(default)s)")
    p_start.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for it")
    p_start.add_argument(
        "--keep-data", action="store_true", help="start DIR's broker again with its data and ports, if any"
    )
    p_start.add_argument("--heap", help=f"the JVM's -Xms/-Xmx (default: the kept broker's, else {HEAP})")
    p_restart = sub.add_parser("restart", help="stop, then start again with the data and ports kept")
    p_restart.add_argument("--dir", required=True, type=Path)
    p_restart.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for it")
    p_stop = sub.add_parser("stop", help="stop the broker (safe when not running)")
    p_stop.add_argument("--dir", required=True, type=Path)
    p_status = sub.add_parser("status", help="exit 0 and print the bootstrap when it serves, else exit 1")
    p_status.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            cached = (cache_dir(args.version) / ".complete").exists()
            began = time.monotonic()
            libs = fetch(args.version)
            if not cached:
                print(f"fetched Kafka {args.version} in {time.monotonic() - began:.1f}s", file=sys.stderr)
            print(libs)
        elif args.cmd == "start":
            began = time.monotonic()
            bootstrap = start(
                args.dir,
                args.port,
                args.controller_port,
                args.version,
                args.timeout,
                keep_data=args.keep_data,
                heap=args.heap,
            )
            print(f"kafka serving in {time.monotonic() - began:.1f}s (files in {args.dir})", file=sys.stderr)
            print(bootstrap)
        elif args.cmd == "restart":
            began = time.monotonic()
            bootstrap = restart(args.dir, args.timeout)
            print(
                f"kafka restarted in {time.monotonic() - began:.1f}s (data kept in {args.dir})",
                file=sys.stderr,
            )
            print(bootstrap)
        elif args.cmd == "stop":
            stop(args.dir)
        else:
            serving = status(args.dir)
            if serving is None:
                print(f"not running ({args.dir})")
                return 1
            print(f"running, pid {_pid(args.dir)}, bootstrap {serving}")
    except KafkaLocalError as exc:
        print(f"kafka_local: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
