"""Tests for jobworker, through the real server over mutual TLS on loopback, with real processes and certificates.

Every server here is `python jobworker.py serve` in its own process; certificates are made with openssl. Isolation
tests need root (as CI runs) and are skipped without it.
"""

import collections
import contextlib
import ctypes
import filecmp
import hashlib
import json
import math
import os
import pwd
import random
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import grpc
import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

import jobworker
from gen import jobworker_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
JOBWORKER = os.path.join(HERE, "jobworker.py")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="isolation needs root")
OK = grpc.StatusCode.OK


# ---------------------------------------------------------------------------------------------------------------------
# Certificates, servers and clients
# ---------------------------------------------------------------------------------------------------------------------

class PKI:
    """Certificates made with openssl: CAs, and any leaf they sign, with any subject, usage and dates."""

    CONFIG = ("[ca]\ndefault_ca = jw\n[jw]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\ndefault_md = sha256\n"
              "policy = anything\nunique_subject = no\nrand_serial = yes\nemail_in_dn = no\n[anything]\n")

    def __init__(self, directory):
        self.dir = directory
        self.ca("ca")

    def _path(self, name, ext):
        return os.path.join(self.dir, f"{name}.{ext}")

    def _key(self, name):
        run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", self._path(name, "key"))
        return self._path(name, "key")

    def ca(self, name):
        directory = os.path.join(self.dir, name + ".d")
        os.makedirs(directory)
        open(os.path.join(directory, "index.txt"), "w").close()
        with open(os.path.join(directory, "ca.cnf"), "w") as f:
            f.write(self.CONFIG.format(d=directory))
        run("openssl", "req", "-x509", "-new", "-sha256", "-days", "30", "-key", self._key(name),
            "-subj", f"/O=jobworker/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", self._path(name, "pem"))
        return self._path(name, "pem")

    def leaf(self, name, subject, ca="ca", usage="clientAuth", start=None, end=None, extra=()):
        """A certificate for `subject` (openssl -subj form) signed by `ca`; returns (cert, key)."""
        key = self._key(name)
        csr = self._path(name, "csr")
        run("openssl", "req", "-new", "-key", key, "-subj", subject, *extra, "-out", csr)
        ext = self._path(name, "ext")
        with open(ext, "w") as f:
            f.write(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n")
            if usage == "serverAuth":
                f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        now = time.time()
        start = start if start is not None else now - 3600
        end = end if end is not None else now + 30 * 86400
        stamp = lambda t: time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t))
        run("openssl", "ca", "-batch", "-config", os.path.join(self.dir, ca + ".d", "ca.cnf"),
            "-cert", self._path(ca, "pem"), "-keyfile", self._path(ca, "key"), "-in", csr,
            "-out", self._path(name, "pem"), "-startdate", stamp(start), "-enddate", stamp(end), "-extfile", ext,
            "-notext", "-preserveDN", "-multivalue-rdn")
        return self._path(name, "pem"), key


def run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    pki = PKI(str(tmp_path_factory.mktemp("pki")))
    pki.server = pki.leaf("server", "/O=jobworker/CN=localhost", usage="serverAuth")
    pki.roles = {
        "admin": pki.leaf("admin", "/O=jobworker/OU=admin/CN=ada"),
        "user": pki.leaf("user", "/O=jobworker/OU=user/CN=alice"),
        "user2": pki.leaf("user2", "/O=jobworker/OU=user/CN=bob"),
        "observer": pki.leaf("observer", "/O=jobworker/OU=observer/CN=olivia"),
    }
    return pki


class Server:
    """`python jobworker.py serve` on a free loopback port, in its own process."""

    def __init__(self, pki, directory, *options, prefix=()):
        self.pki = pki
        os.makedirs(directory, exist_ok=True)
        self.data_dir = os.path.join(directory, "data")
        self.log_path = os.path.join(directory, "server.log")
        self.log = open(self.log_path, "wb")
        cert, key = pki.server
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, JOBWORKER, "serve", "--addr", "127.0.0.1:0", "--cert", cert, "--key", key,
             "--ca", pki._path("ca", "pem"), "--data-dir", self.data_dir, *options],
            stdout=subprocess.PIPE, stderr=self.log, env=dict(os.environ, JOBWORKER_SECRET="hunter2"))
        line = self.proc.stdout.readline().decode()
        match = re.match(r"listening on port (\d+)", line)
        if not match:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._end()
            raise RuntimeError(f"server did not start: {line!r} {self.read_log()}")
        self.addr = f"127.0.0.1:{match.group(1)}"
        self._clients = []
        SERVERS.append(self)

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def client(self, role="admin"):
        cert, key = self.pki.roles[role] if isinstance(role, str) else role
        client = jobworker.Client(self.addr, cert, key, self.pki._path("ca", "pem"))
        self._clients.append(client)
        return client

    def cli(self, *argv, role="admin", timeout=60, **kwargs):
        cert, key = self.pki.roles[role]
        action, rest = argv[0], argv[1:]
        return subprocess.run(
            [sys.executable, JOBWORKER, action, "--addr", self.addr, "--cert", cert, "--key", key,
             "--ca", self.pki._path("ca", "pem"), *rest], capture_output=True, timeout=timeout, **kwargs)

    def stop(self, sig=signal.SIGTERM):
        for client in self._clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):  # where each thread is stuck, if py-spy is installed
                subprocess.run([os.path.join(os.path.dirname(sys.executable), "py-spy"), "dump", "--pid",
                                str(self.proc.pid)])
            raise
        finally:
            self._end()
        return code

    def _end(self):
        """Kills the server if it still runs (its jobs die with it) and closes what we hold of it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


SERVERS = []  # every Server started, so that none outlives the test that started it


@pytest.fixture(autouse=True)
def no_server_left_behind():
    """Stops the servers a test started and did not stop (it failed before its own cleanup, say)."""
    before = len(SERVERS)
    yield
    for left in SERVERS[before:]:
        if left.proc.poll() is None:
            with contextlib.suppress(Exception):
                left.stop()
    del SERVERS[before:]


@pytest.fixture(scope="session")
def server(pki, tmp_path_factory):
    server = Server(pki, str(tmp_path_factory.mktemp("server")))
    yield server
    assert server.stop() == 0, server.read_log()
    assert not cgroups_of(server.proc.pid), "a cgroup outlived the server"


@pytest.fixture
def admin(server):
    return server.client("admin")


def cgroups_of(server_pid):
    """The cgroup directories a server made (its jobworker-PID directories and its jobs' groups), still present."""
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(root) == f"jobworker-{server_pid}":
            found += [root] + [os.path.join(root, d) for d in dirs]
            dirs[:] = []
    return found


def collect(client, job_id, offset=0):
    """(stdout, stderr, final status, messages) of a whole stream."""
    out, err, status, messages = bytearray(), bytearray(), None, 0
    for message in client.stream(job_id, offset):
        messages += 1
        (err if message.source == pb.StreamResponse.STDERR else out).extend(message.data)
        if message.HasField("status"):
            status = message.status
    return bytes(out), bytes(err), status, messages


def run_job(client, command, **limits):
    job_id = client.start(command, **limits)
    out, err, status, _ = collect(client, job_id)
    return out, err, status


def code_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return OK


def processes_with(marker):
    """Host pids of live processes whose command line holds `marker`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def py(code):
    """A job running Python code, with the host's system interpreter (which the job's PATH finds)."""
    return ["python3", "-c", code]


def pattern(blocks, size=1 << 20):
    """The bytes PATTERN_JOB writes: `blocks` blocks of pseudo-random bytes, each numbered."""
    rng = random.Random(7)
    return b"".join(i.to_bytes(8, "big") + rng.randbytes(size - 8) for i in range(blocks))


PATTERN_JOB = ("import random, sys\nrng = random.Random(7)\nout = sys.stdout.buffer\n"
               "for i in range({blocks}):\n    out.write(i.to_bytes(8, 'big') + rng.randbytes({size} - 8))\n")


# ---------------------------------------------------------------------------------------------------------------------
# The API and its stubs
# ---------------------------------------------------------------------------------------------------------------------

def test_committed_stubs_match_the_proto(tmp_path):
    (tmp_path / "gen").mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Igen=.", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "jobworker.proto"], cwd=HERE, check=True)  # as `make gen` does
    for name in ("jobworker_pb2.py", "jobworker_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "gen" / name, os.path.join(HERE, "gen", name), shallow=False), \
            f"gen/{name} is stale: run `make gen`"


def test_every_rpc_has_a_policy_entry():
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["JobWorker"].methods}
    assert methods == set(jobworker.POLICY)
    for roles in jobworker.POLICY.values():
        assert set(roles) <= set(jobworker.ROLES)


def test_parse_size():
    assert jobworker.parse_size("4096") == 4096
    assert jobworker.parse_size("512K") == 512 << 10
    assert jobworker.parse_size("100m") == 100 << 20
    assert jobworker.parse_size("2G") == 2 << 30
    for bad in ("", "G", "1.5G", "-1", "1KB", "10X"):
        with pytest.raises(ValueError):
            jobworker.parse_size(bad)


def test_output_messages_are_the_bytes_protobuf_would_write():
    """Streams serialize their output messages themselves (one copy fewer): they must be what protobuf writes."""
    sizes = (1, 127, 128, 16383, 16384, jobworker.STREAM_CHUNK)
    offsets = (0, 1, 127, 128, 300, 2 ** 32, 2 ** 63, 2 ** 64 - 1)
    for source in (pb.StreamResponse.STDOUT, pb.StreamResponse.STDERR):
        for size in sizes:
            data = os.urandom(size)
            for offset in offsets:
                encoded = jobworker.encode_output(source, offset, data)
                assert encoded == pb.StreamResponse(source=source, offset=offset, data=data).SerializeToString()
                assert pb.StreamResponse.FromString(encoded) == pb.StreamResponse(source=source, offset=offset, data=data)


# ---------------------------------------------------------------------------------------------------------------------
# Jobs: start, stream, query, list, stop
# ---------------------------------------------------------------------------------------------------------------------

def test_happy_path_start_stream_query_list(admin):
    job_id = admin.start(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert str(uuid.UUID(job_id)) == job_id
    out, err, status, _ = collect(admin, job_id)
    assert (out, err) == (b"out\n", b"err\n")
    assert status.state == pb.EXITED and status.exit_code == 3 and status.signal == 0
    queried = admin.query(job_id)
    assert queried.job_id == job_id and queried.owner == "ada"
    assert list(queried.command) == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert queried.output_bytes == 8 and queried.pid > 0
    assert queried.ended_at.ToNanoseconds() >= queried.started_at.ToNanoseconds() > 0
    later = admin.start(["true"])
    listed = [s.job_id for s in admin.list()]
    assert listed.index(later) < listed.index(job_id), "List is newest first"


def test_job_killed_by_signal_reports_it(admin):
    _, _, status = run_job(admin, ["sh", "-c", "kill -TERM $$"])
    assert status.state == pb.EXITED and not status.HasField("exit_code") and status.signal == signal.SIGTERM


def test_binary_output_is_byte_exact_and_streams_stay_apart(admin):
    data = bytes(range(256)) * 64
    code = ("import sys\ndata = bytes(range(256)) * 64\n"
            "sys.stdout.buffer.write(data); sys.stdout.flush()\nsys.stderr.buffer.write(data[::-1])")
    out, err, status = run_job(admin, py(code))
    assert out == data and err == data[::-1] and status.exit_code == 0


def test_output_larger_than_100_mb_is_byte_exact(admin):
    blocks = 120
    out, err, status = run_job(admin, py(PATTERN_JOB.format(blocks=blocks, size=1 << 20)))
    assert status.exit_code == 0, err
    assert len(out) == blocks << 20
    assert hashlib.sha256(out).digest() == hashlib.sha256(pattern(blocks)).digest()


@pytest.mark.skipif(not shutil.which("fincore"), reason="util-linux's fincore is needed to see the page cache")
def test_output_leaves_the_page_cache_behind_it_streamed_live_or_again(server, admin):
    """What the disk has taken and every stream has read is dropped from memory, so a job's output does not fill the
    page cache: neither streamed live, nor read again once the job has ended."""
    size, bound = 96 << 20, 3 * jobworker.OutputLog.WRITE_BEHIND  # the last steps of the writer and the reader
    job_id = admin.start(["head", "-c", str(size), "/dev/zero"])
    path = os.path.join(server.data_dir, "jobs", f"{job_id}.output")

    def resident():
        return int(subprocess.check_output(["fincore", "--bytes", "--noheadings", "--output", "RES", path]))
    for _ in ("live", "again"):
        out, _, status, _ = collect(admin, job_id)
        assert len(out) == size and status.exit_code == 0
        assert resident() <= bound


def test_job_environment_is_clean_and_stdin_empty(admin):
    out, _, status = run_job(admin, ["sh", "-c", "env; cat; echo end"])
    env = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    assert "JOBWORKER_SECRET" not in env, "the server's environment leaked into the job"
    assert env["PATH"] and env["LANG"] and "HOME" in env
    assert out.endswith(b"end\n") and status.exit_code == 0


class Gate:
    """Holds a job at a point until the test lets it on, without sleeps: the job connects to this Unix socket, says
    it is ready, and blocks reading from it until the test opens the gate (closes the connection)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="jobworker-gate-")
        os.chmod(self.dir, 0o755)  # jobs run as nobody
        self.path = os.path.join(self.dir, "gate")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o777)
        self.listener.listen()
        self.listener.settimeout(60)

    def hold(self, before="print('ready', flush=True)\n"):
        """Python code that holds the job at this point."""
        return (f"import socket\ngate = socket.socket(socket.AF_UNIX)\ngate.connect({self.path!r})\n{before}"
                f"gate.recv(1)\n")

    def open(self):
        connection, _ = self.listener.accept()
        connection.close()

    def close(self):
        self.listener.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.close()


def test_concurrent_streamers_of_a_live_job_get_identical_complete_output(admin, gate):
    code = gate.hold() + PATTERN_JOB.format(blocks=24, size=65536)
    job_id = admin.start(py(code))
    results, first_bytes = [None] * 8, threading.Barrier(9)

    def stream(i):
        out, streaming = bytearray(), admin.stream(job_id)
        for message in streaming:
            out += message.data
            if len(out) == 6 and message.data:
                first_bytes.wait(30)  # every reader is attached while the job is still running
            if message.HasField("status"):
                results[i] = (bytes(out), message.status)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    first_bytes.wait(30)
    gate.open()
    for t in threads:
        t.join(60)
    expected = b"ready\n" + pattern(24, 65536)
    for out, status in results:
        assert out == expected and status.exit_code == 0


def test_stream_resumes_from_an_offset(admin):
    job_id = admin.start(["sh", "-c", "printf abc; printf DEF >&2; printf ghi"])
    tagged = [(m.source, byte) for m in admin.stream(job_id) for byte in m.data]  # every byte, in arrival order
    assert len(tagged) == 9
    for offset in range(len(tagged) + 1):
        out, err, final, _ = collect(admin, job_id, offset)
        assert out == bytes(b for source, b in tagged[offset:] if source == pb.StreamResponse.STDOUT)
        assert err == bytes(b for source, b in tagged[offset:] if source == pb.StreamResponse.STDERR)
        assert final.exit_code == 0
    assert code_of(lambda: collect(admin, job_id, len(tagged) + 1)) == grpc.StatusCode.OUT_OF_RANGE


def test_stream_messages_carry_offsets_in_arrival_order(admin):
    job_id = admin.start(["sh", "-c", "printf abc; printf DEF >&2; printf ghi"])
    collect(admin, job_id)
    seen = [(m.source, m.offset, m.data) for m in admin.stream(job_id) if m.data]
    assert b"".join(d for _, _, d in seen) in (b"abcDEFghi", b"abcghiDEF", b"DEFabcghi")
    for (_, offset, data), (_, following, _) in zip(seen, seen[1:]):
        assert offset + len(data) == following


def test_graceful_stop_delivers_sigterm_to_the_command(admin):
    job_id = admin.start(["sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 600 & wait"])
    next(iter(admin.stream(job_id)))  # it is running and has set its trap
    status = admin.stop(job_id, timeout=30)
    assert status.state == pb.STOPPED and status.exit_code == 7
    out, _, _, _ = collect(admin, job_id)
    assert out == b"ready\ngot TERM\n"


def test_stop_escalates_to_sigkill_for_a_job_that_ignores_sigterm(admin):
    job_id = admin.start(py("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                            "print('ready', flush=True)\ntime.sleep(600)"))
    next(iter(admin.stream(job_id)))
    started = time.monotonic()
    status = admin.stop(job_id, timeout=0.5)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    assert time.monotonic() - started < 30


def test_force_stop_kills_at_once(admin):
    job_id = admin.start(["sleep", "600"])
    status = admin.stop(job_id, force=True)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL


def test_stop_reaches_children_and_grandchildren(admin):
    marker = str(random.randint(10 ** 8, 10 ** 9))
    job_id = admin.start(["sh", "-c", f"sh -c 'sleep {marker} & sleep {marker}' & sleep {marker} & echo ready; wait"])
    next(iter(admin.stream(job_id)))
    assert processes_with(marker)
    admin.stop(job_id, timeout=5)
    assert processes_with(marker) == [], "a process of the stopped job is still running"


def test_a_job_ends_with_its_command_and_takes_what_it_left_running(admin):
    marker = str(random.randint(10 ** 8, 10 ** 9))
    out, _, status = run_job(admin, ["sh", "-c", f"sleep {marker} & echo left a child behind"])
    assert status.state == pb.EXITED and status.exit_code == 0 and out == b"left a child behind\n"
    assert processes_with(marker) == []


def test_stopping_an_ended_job_returns_its_final_status_unchanged(admin):
    _, _, status = run_job(admin, ["sh", "-c", "exit 4"])
    again = admin.stop(status.job_id)
    assert again.state == pb.EXITED and again.exit_code == 4 and again.ended_at == status.ended_at


def test_commands_that_cannot_run_fail_start_and_leave_no_job(admin, tmp_path):
    before = len(admin.list())
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    cases = {
        "empty": [],
        "no such file": ["/no/such/program"],
        "not on PATH": ["no-such-program-anywhere"],
        "not executable": [str(script)],
        "a directory": ["/"],
        "NUL byte": ["echo", "a\0b"],
        "argument too long": ["echo", "x" * (200 * 1024)],
    }
    for name, command in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            admin.start(command)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert caught.value.details(), name
    assert len(admin.list()) == before
    assert "No such file" in str(pytest.raises(grpc.RpcError, admin.start, ["/no/such/program"]).value.details())


def test_bad_job_ids_and_unknown_jobs(admin):
    for bad in ("", "not-a-uuid", "7D185458-2063-4754-B333-E0A322C26FD9", "x" * 10000, "é"):
        assert code_of(lambda: admin.query(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = str(uuid.uuid4())
    for call in (admin.query, admin.stop, lambda j: collect(admin, j)):
        assert code_of(lambda: call(unknown)) == grpc.StatusCode.NOT_FOUND


def test_bad_stop_timeouts_and_limits(admin):
    job_id = admin.start(["sleep", "600"])
    for timeout in (-1, float("nan"), float("inf"), 10 ** 9):
        assert code_of(lambda: admin.stop(job_id, timeout=timeout)) == grpc.StatusCode.INVALID_ARGUMENT
    admin.stop(job_id, force=True)
    assert code_of(lambda: admin.start(["true"], cpu_cores=-1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: admin.start(["true"], cpu_cores=float("nan"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: admin.start(["true"], cpu_cores=10 ** 6)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: admin.start(["true"], memory_bytes=2 ** 63)) == grpc.StatusCode.INVALID_ARGUMENT


def test_audit_log_records_every_start_and_stop(server, admin):
    job_id = admin.start(["sleep", "600"])
    admin.stop(job_id, force=True)
    observer = server.client("observer")
    assert code_of(lambda: observer.start(["true"])) == grpc.StatusCode.PERMISSION_DENIED
    with open(os.path.join(server.data_dir, "audit.log")) as f:
        entries = [json.loads(line) for line in f]
    start = next(e for e in entries if e["action"] == "start" and e["job_id"] == job_id)
    stop = next(e for e in entries if e["action"] == "stop" and e["job_id"] == job_id)
    assert start["who"] == "ada" and start["role"] == "admin" and start["result"] == "OK"
    assert start["command"] == ["sleep", "600"] and start["time"]
    assert stop["result"] == "OK" and stop["force"] is True
    denied = [e for e in entries if e["who"] == "olivia" and e["action"] == "start"]
    assert denied and denied[-1]["result"] == "PERMISSION_DENIED"


# ---------------------------------------------------------------------------------------------------------------------
# Roles and certificates
# ---------------------------------------------------------------------------------------------------------------------

def test_role_matrix(server):
    clients = {role: server.client(role) for role in ("admin", "user", "user2", "observer")}
    DENIED, HIDDEN = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND
    everything, nothing = {"Query": OK, "Stream": OK, "Stop": OK}, {"Query": HIDDEN, "Stream": HIDDEN, "Stop": HIDDEN}
    watch_only = {"Query": OK, "Stream": OK, "Stop": DENIED}
    expected = {  # (caller, owner of the job) -> outcome of each call on that job
        ("admin", "admin"): everything, ("admin", "user"): everything,
        ("user", "user"): everything, ("user", "admin"): nothing, ("user2", "user"): nothing,
        ("observer", "admin"): watch_only, ("observer", "user"): watch_only,
    }
    for (caller, owner), outcomes in expected.items():
        for method, outcome in outcomes.items():
            job_id = clients[owner].start(["sh", "-c", "echo hi; sleep 600"])  # a fresh job: a Stop ends it
            client = clients[caller]
            call = {"Query": lambda: client.query(job_id), "Stream": lambda: next(iter(client.stream(job_id))),
                    "Stop": lambda: client.stop(job_id, force=True)}[method]
            assert code_of(call) == outcome, (caller, owner, method)
            clients["admin"].stop(job_id, force=True)
    assert code_of(lambda: clients["admin"].start(["true"])) == OK
    assert code_of(lambda: clients["user"].start(["true"])) == OK
    refusal = pytest.raises(grpc.RpcError, clients["observer"].start, ["true"]).value
    assert refusal.code() == DENIED and refusal.details() == "observers cannot start jobs"
    owners = {role: {status.owner for status in clients[role].list()} for role in clients}
    assert owners["user"] == {"alice"} and owners["user2"] == set()
    assert {"ada", "alice"} <= owners["admin"] and owners["observer"] == owners["admin"]


def expect_refused(server, cert_and_key, ca=None, codes=(grpc.StatusCode.UNAVAILABLE,)):
    cert, key = cert_and_key
    client = jobworker.Client(server.addr, cert, key, ca or server.pki._path("ca", "pem"))
    try:
        stream = lambda: next(client.stub.Stream(pb.StreamRequest(job_id=str(uuid.uuid4()))))  # no reconnecting
        for call in (client.list, lambda: client.query(str(uuid.uuid4())), lambda: client.start(["true"]),
                     lambda: client.stop(str(uuid.uuid4())), stream):
            assert code_of(call) in codes
    finally:
        client.close()


def test_refused_certificates(server, pki):
    now = time.time()
    handshake = (grpc.StatusCode.UNAVAILABLE,)
    other = PKI(os.path.join(pki.dir, "other"))
    expect_refused(server, other.leaf("stranger", "/O=jobworker/OU=admin/CN=mallory"), codes=handshake)
    expect_refused(server, pki.leaf("expired", "/O=jobworker/OU=admin/CN=old", start=now - 86400 * 10,
                                    end=now - 86400), codes=handshake)
    expect_refused(server, pki.leaf("future", "/O=jobworker/OU=admin/CN=new", start=now + 86400,
                                    end=now + 86400 * 10), codes=handshake)
    denied = (grpc.StatusCode.PERMISSION_DENIED,)
    expect_refused(server, pki.leaf("norole", "/O=jobworker/CN=nobody"), codes=denied)
    expect_refused(server, pki.leaf("tworoles", "/O=jobworker/OU=admin/OU=observer/CN=both"), codes=denied)
    expect_refused(server, pki.leaf("unknown", "/O=jobworker/OU=root/CN=who"), codes=denied)
    expect_refused(server, pki.leaf("samerole", "/O=jobworker/OU=admin/OU=admin/CN=twice"), codes=denied)
    expect_refused(server, pki.leaf("nocn", "/O=jobworker/OU=admin"), codes=(grpc.StatusCode.UNAUTHENTICATED,))


def test_no_client_certificate_is_refused(server):
    channel = grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(
        root_certificates=open(server.pki._path("ca", "pem"), "rb").read()))
    stub = jobworker.pb_grpc.JobWorkerStub(channel)
    assert code_of(lambda: stub.List(pb.ListRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_plaintext_is_refused(server):
    channel = grpc.insecure_channel(server.addr)
    stub = jobworker.pb_grpc.JobWorkerStub(channel)
    assert code_of(lambda: stub.List(pb.ListRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_values_that_look_like_an_ou_are_not_taken_for_one(server, pki):
    # The CN holds ",OU=admin" and "+OU=admin": a parser of the RFC 2253 string could read an admin OU into it.
    sneaky = pki.leaf("sneaky", "/O=jobworker/OU=observer/CN=eve\\,OU=admin")
    client = jobworker.Client(server.addr, *sneaky, server.pki._path("ca", "pem"))
    assert code_of(lambda: client.start(["true"])) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(client.list) == OK
    client.close()
    plus = pki.leaf("plus", "/O=jobworker/OU=observer/CN=eve\\+OU=admin")
    client = jobworker.Client(server.addr, *plus, server.pki._path("ca", "pem"))
    assert code_of(lambda: client.start(["true"])) == grpc.StatusCode.PERMISSION_DENIED
    client.close()
    multivalued = pki.leaf("multi", "/O=jobworker/OU=user+CN=mv")  # a multi-valued RDN: OU and CN together
    client = jobworker.Client(server.addr, *multivalued, server.pki._path("ca", "pem"))
    assert code_of(lambda: client.start(["true"])) == OK
    client.close()
    organisation = pki.leaf("org", "/O=OU=admin/OU=user/CN=o")
    der = jobworker._pem_to_der(open(organisation[0]).read())
    assert jobworker.identify(open(organisation[0], "rb").read()).role == "user"
    assert ("2.5.4.10", "OU=admin") in jobworker.subject_attributes(memoryview(der))


def test_subject_parser_refuses_malformed_der():
    good = bytes.fromhex("3082")  # truncated
    for der in (good, b"", b"\x30\x80", b"\x30\x84\x00\x00\x00\x01\x00", b"\x30\x81\x05abcde"):
        with pytest.raises((ValueError, IndexError)):
            jobworker.subject_attributes(memoryview(der))


class LoopbackProxy:
    """Listens on a loopback port and connects each client to `target`; subclasses relay what passes."""

    def __init__(self, target):
        self.target = target.rsplit(":", 1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._connected(client, socket.create_connection((self.target[0], int(self.target[1]))))

    def _connected(self, client, upstream):
        raise NotImplementedError  # each kind of proxy relays in its own way


class TLSProxy(LoopbackProxy):
    """Plain TCP in on loopback, TLS out to the server with the client certificate, at a chosen TLS version.

    gRPC Python cannot choose its TLS version; Python's ssl can. A gRPC client speaks plaintext HTTP/2 to this proxy,
    which carries it to the server over a TLS connection it made itself.
    """

    def __init__(self, server, role, version):
        cert, key = server.pki.roles[role]
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server.pki._path("ca", "pem"))
        self.context.load_cert_chain(cert, key)
        self.context.minimum_version = self.context.maximum_version = version
        self.context.set_alpn_protocols(["h2"])
        self.versions = []
        super().__init__(server.addr)

    def _connected(self, plain, upstream):
        tls = self.context.wrap_socket(upstream, server_hostname="localhost")
        self.versions.append(tls.version())
        threading.Thread(target=self._relay, args=(plain, tls), daemon=True).start()

    @staticmethod
    def _relay(plain, tls):
        """Both directions in one thread: an SSL socket must not be read and written from two threads at once."""
        try:
            while True:
                ready = [tls] if tls.pending() else select.select([plain, tls], [], [])[0]
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (tls if source is plain else plain).sendall(data)
        except OSError:
            pass
        finally:
            for s in (plain, tls):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self):
        self.listener.close()


def test_every_rpc_requires_tls_1_3(server):
    for version, expected in ((ssl.TLSVersion.TLSv1_2, grpc.StatusCode.UNAUTHENTICATED),
                              (ssl.TLSVersion.TLSv1_3, OK)):
        proxy = TLSProxy(server, "admin", version)
        channel = grpc.insecure_channel(proxy.addr)
        stub = jobworker.pb_grpc.JobWorkerStub(channel)
        try:
            assert code_of(lambda: stub.List(pb.ListRequest(), timeout=10)) == expected
            if expected != OK:
                assert code_of(lambda: stub.Start(pb.StartRequest(command=["true"]), timeout=10)) == expected
                responses = stub.Stream(pb.StreamRequest(job_id=str(uuid.uuid4())), timeout=10)
                assert code_of(lambda: next(responses)) == expected
        finally:
            channel.close()
            proxy.close()
        assert proxy.versions and set(proxy.versions) == {"TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3"}


def test_tls_1_2_offers_only_ecdhe_aead_suites(server):
    cert, key = server.pki.roles["admin"]
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server.pki._path("ca", "pem"))
    context.load_cert_chain(cert, key)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    host, port = server.addr.rsplit(":", 1)
    weak = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:AES128-GCM-SHA256:AES128-SHA"
    context.set_ciphers(weak)
    with pytest.raises(ssl.SSLError):
        with context.wrap_socket(socket.create_connection((host, int(port))), server_hostname="localhost"):
            pass


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def test_cli_session(server):
    started = server.cli("start", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 5")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.decode().strip()
    assert started.stdout.decode() == job_id + "\n" and str(uuid.UUID(job_id)) == job_id
    streamed = server.cli("stream", job_id)
    assert (streamed.stdout, streamed.stderr, streamed.returncode) == (b"to-out\n", b"to-err\n", 5)
    resumed = server.cli("stream", "--offset", "3", job_id)
    assert resumed.stdout == b"out\n" and resumed.returncode == 5
    queried = server.cli("query", "--json", job_id)
    status = json.loads(queried.stdout)
    assert status["job_id"] == job_id and status["state"] == "EXITED" and status["exit_code"] == 5
    assert "output_bytes" in status and "started_at" in status
    human = server.cli("query", job_id).stdout.decode()
    assert job_id in human and "EXITED" in human
    listed = json.loads(server.cli("list", "--json").stdout)
    assert job_id in [job["job_id"] for job in listed["jobs"]]
    assert job_id in server.cli("list").stdout.decode()
    sleeper = server.cli("start", "--memory", "64M", "--pids", "50", "--cpu", "0.5", "--", "sleep", "600")
    sleeper_id = sleeper.stdout.decode().strip()
    stopped = server.cli("stop", "--timeout", "1", "--json", sleeper_id)
    assert json.loads(stopped.stdout)["state"] == "STOPPED"
    signalled = server.cli("stream", sleeper_id)
    assert signalled.returncode == 128 + signal.SIGTERM
    forced = server.cli("stop", "--force", server.cli("start", "--", "sleep", "600").stdout.decode().strip())
    assert forced.returncode == 0 and b"STOPPED" in forced.stdout


def test_cli_errors_are_one_line_naming_the_status(server):
    cases = [
        (("start", "--", "sleep", "1"), "observer", "PERMISSION_DENIED: observers cannot start jobs"),
        (("query", str(uuid.uuid4())), "admin", "NOT_FOUND: "),
        (("query", "nonsense"), "admin", "INVALID_ARGUMENT: "),
        (("start", "--", "/no/such"), "admin", "INVALID_ARGUMENT: "),
        (("stream", "--offset", "999999", str(uuid.uuid4())), "admin", "NOT_FOUND: "),
    ]
    for argv, role, expected in cases:
        result = server.cli(*argv, role=role)
        lines = result.stderr.decode().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(expected), (argv, result.stderr)
        assert b"Traceback" not in result.stderr
    down = subprocess.run([sys.executable, JOBWORKER, "list", "--addr", "127.0.0.1:1", "--cert",
                           server.pki.roles["admin"][0], "--key", server.pki.roles["admin"][1],
                           "--ca", server.pki._path("ca", "pem")], capture_output=True, timeout=60)
    assert down.returncode != 0 and down.stderr.decode().startswith("UNAVAILABLE: ")
    assert len(down.stderr.decode().splitlines()) == 1


def test_cli_connection_flags_come_from_the_environment(server):
    cert, key = server.pki.roles["observer"]
    env = dict(os.environ, JOBWORKER_ADDR=server.addr, JOBWORKER_CERT=cert, JOBWORKER_KEY=key,
               JOBWORKER_CA=server.pki._path("ca", "pem"))
    result = subprocess.run([sys.executable, JOBWORKER, "start", "--", "true"], env=env, capture_output=True, timeout=60)
    assert result.stderr.decode().startswith("PERMISSION_DENIED: observers cannot start jobs")


class CuttableProxy(LoopbackProxy):
    """A TCP proxy on loopback whose connections the test can cut, to drop a client's stream mid-way."""

    def __init__(self, target):
        self.connections, self.accepted = [], threading.Semaphore(0)
        self.relayed = 0
        super().__init__(target)

    def _connected(self, client, upstream):
        self.connections += [client, upstream]
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()
        self.accepted.release()

    def _before_sending(self, from_server):
        """A hook: what the proxy does before it passes data on."""

    def _pipe(self, source, sink, from_server=False):
        try:
            while data := source.recv(65536):
                self._before_sending(from_server)
                sink.sendall(data)
                if from_server:
                    self.relayed += len(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self):
        for s in self.connections:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.connections = []

    def close(self):
        self.listener.close()
        self.cut()


def test_cli_stream_reconnects_and_resumes_without_gap_or_repeat(server, admin, gate):
    blocks = 16
    code = PATTERN_JOB.format(blocks=blocks // 2, size=65536) + gate.hold("sys.stdout.flush()\n") + \
        PATTERN_JOB.format(blocks=blocks // 2, size=65536)
    job_id = admin.start(py(code))
    collect_until(admin, job_id, (blocks // 2) * 65536)  # the job holds at the gate after the first half
    proxy = CuttableProxy(server.addr)
    cert, key = server.pki.roles["admin"]
    cli = subprocess.Popen([sys.executable, JOBWORKER, "stream", "--addr", proxy.addr, "--cert", cert, "--key", key,
                            "--ca", server.pki._path("ca", "pem"), job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = read_exactly(cli.stdout, (blocks // 2) * 65536)  # the first half, live
    proxy.accepted.acquire(timeout=30)
    proxy.cut()  # the connection drops mid-stream; the job then writes the second half
    gate.open()
    rest, err = cli.communicate(timeout=120)
    proxy.close()
    half = pattern(blocks // 2, 65536)
    assert cli.returncode == 0, err
    assert got + rest == half + half
    assert proxy.accepted.acquire(timeout=0), "the client never reconnected"


def collect_until(client, job_id, size):
    """Streams until `size` bytes of the job's output exist (the job has reached a point), then returns."""
    got = 0
    for message in client.stream(job_id):
        got += len(message.data)
        if got >= size:
            return


def read_exactly(pipe, size):
    data = bytearray()
    while len(data) < size:
        chunk = pipe.read1(size - len(data))
        assert chunk, "the stream ended early"
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------------------------------------------------------------
# Server lifecycle
# ---------------------------------------------------------------------------------------------------------------------

def test_shutdown_stops_every_job_and_leaves_nothing(pki, tmp_path):
    server = Server(pki, str(tmp_path))
    admin = server.client()
    marker = str(random.randint(10 ** 8, 10 ** 9))
    ids = [admin.start(["sh", "-c", f"sleep {marker} & echo ready; wait"]) for _ in range(3)]
    ids.append(admin.start(py(f"import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                              f"print('ready', flush=True)\ntime.sleep({marker})")))
    for job_id in ids:
        next(iter(admin.stream(job_id)))
    streams = [admin.stub.Stream(pb.StreamRequest(job_id=job_id)) for job_id in ids]
    launcher = [int(p) for p in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()]
    assert server.stop(signal.SIGTERM) == 0, server.read_log()
    assert processes_with(marker) == []
    assert all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
               for pid in launcher)
    assert not cgroups_of(server.proc.pid)
    for s in streams:
        with contextlib.suppress(grpc.RpcError):
            for _ in s:
                pass


def test_server_start_failures_exit_at_once_with_a_clear_message(pki, tmp_path):
    cert, key = pki.server
    ca = pki._path("ca", "pem")

    def serve(*argv):
        return subprocess.run([sys.executable, JOBWORKER, "serve", *argv], capture_output=True, timeout=60)

    base = ["--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")]
    missing = serve("--cert", str(tmp_path / "nope.pem"), "--key", key, "--ca", ca, *base)
    assert missing.returncode != 0 and b"nope.pem" in missing.stderr and b"Traceback" not in missing.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = serve("--cert", cert, "--key", key, "--ca", ca, "--addr", "127.0.0.1:0",
                       "--data-dir", str(blocker / "sub"))
    assert unwritable.returncode != 0 and b"data directory" in unwritable.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        in_use = serve("--cert", cert, "--key", key, "--ca", ca, "--addr", f"127.0.0.1:{port}",
                       "--data-dir", str(tmp_path / "d2"))
    assert in_use.returncode != 0 and b"cannot listen" in in_use.stderr and b"Traceback" not in in_use.stderr
    mismatched = serve("--cert", cert, "--key", pki.roles["admin"][1], "--ca", ca, *base)
    assert mismatched.returncode != 0 and b"Traceback" not in mismatched.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Isolation
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root_server(pki, tmp_path_factory):
    """A server whose jobs run as root (still in their namespaces and cgroups), for what only root can try."""
    if not ROOT:
        pytest.skip("needs root")
    server = Server(pki, str(tmp_path_factory.mktemp("root-server")), "--isolation", "on", "--run-as", "root")
    yield server
    assert server.stop() == 0


@needs_root
def test_status_reports_the_isolation_that_applies(admin):
    job_id = admin.start(["true"], memory_bytes=64 << 20, cpu_cores=0.5, pids=100)
    _, _, status, _ = collect(admin, job_id)
    isolation = status.isolation
    assert isolation.mode == "auto" and isolation.cgroup in ("v1", "v2")
    assert set(isolation.namespaces) == {"pid", "mount", "network"}
    assert isolation.limits.memory_bytes == 64 << 20 and isolation.limits.cpu_cores == 0.5
    assert isolation.limits.pids == 100 and isolation.user == "nobody"


@needs_root
def test_a_job_over_its_memory_limit_is_killed_and_reported_as_such(admin):
    out, err, status = run_job(admin, py("data = bytearray(256 << 20)\nprint('survived')"), memory_bytes=32 << 20)
    assert status.state == pb.OOM_KILLED and status.signal == signal.SIGKILL and status.usage.oom_killed
    assert b"survived" not in out
    assert status.usage.peak_memory_bytes <= 33 << 20


@needs_root
def test_a_cpu_capped_busy_loop_uses_no_more_than_its_quota(admin):
    out, err, status = run_job(admin, py("import time\nend = time.time() + 2\nwhile time.time() < end: pass"),
                               cpu_cores=0.25)
    wall = (status.ended_at.ToNanoseconds() - status.started_at.ToNanoseconds()) / 1e9
    assert status.exit_code == 0, err
    assert status.usage.cpu_seconds <= 0.25 * wall * 1.2 + 0.05, (status.usage.cpu_seconds, wall)
    assert status.usage.cpu_seconds >= 0.25 * wall * 0.5, "the loop did not run"


@needs_root
def test_a_job_at_its_process_limit_cannot_fork_more(admin):
    code = ("import os, sys, time\nchildren = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        print('refused', e.errno); break\n    if pid == 0:\n"
            "        time.sleep(60); os._exit(0)\n    children += 1\nprint('children', children)")
    out, err, status = run_job(admin, py(code), pids=5)
    assert b"refused 11" in out and b"children 4" in out, (out, err)  # 5 processes: python and 4 children


@needs_root
def test_a_job_sees_only_its_own_processes_and_only_loopback(admin, server):
    code = ("import os, socket\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\nprint(pids)\n"
            "print(sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]))\n"
            "s = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection(s.getsockname(), timeout=5)\n"
            "print('loopback up')\n"
            "try:\n    socket.create_connection(('127.0.0.1', %d), timeout=5)\n    print('reached the host')\n"
            "except OSError as e:\n    print('host unreachable', e.errno)\n"
            "try:\n    socket.create_connection(('8.8.8.8', 53), timeout=5)\nexcept OSError as e:\n"
            "    print('no route', e.errno)\n")
    host_port = int(server.addr.rsplit(":", 1)[1])
    out, err, status = run_job(admin, py(code % host_port))
    lines = out.decode().splitlines()
    assert lines[0] == "[1, 2]", out  # the init and the command, nothing of the host's
    assert lines[1] == "['lo']"
    assert lines[2] == "loopback up"
    assert lines[3].startswith("host unreachable"), "a job reached a listener on the host's loopback"
    assert lines[4] == "no route 101"


@needs_root
def test_a_mount_inside_a_job_does_not_reach_the_host(root_server, tmp_path):
    client = root_server.client()
    target = str(tmp_path / "mnt")
    os.mkdir(target)
    out, err, status = run_job(client, ["sh", "-c", f"mount -t tmpfs jobtmpfs {target} && grep -c {target} /proc/mounts"])
    assert status.exit_code == 0 and out == b"1\n", err
    with open("/proc/self/mountinfo") as f:
        assert target not in f.read()


@needs_root
def test_a_double_forked_daemon_is_gone_after_stop(admin):
    marker = str(random.randint(10 ** 8, 10 ** 9))
    job_id = admin.start(["sh", "-c", f"setsid sh -c 'sleep {marker} & echo daemon' ; echo ready; sleep {marker}"])
    collect_until(admin, job_id, len(b"daemon\nready\n"))
    assert len(processes_with(marker)) >= 2  # the daemon, the foreground sleep (and the shell naming them)
    admin.stop(job_id, timeout=5)
    assert processes_with(marker) == []


@needs_root
def test_zombies_are_reaped_and_the_exit_status_is_the_commands_own(admin):
    code = ("import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    if os.fork() == 0:\n"
            "        os.close(r); os._exit(0)\n    os._exit(0)\nos.close(w); os.read(r, 1); os.wait()\n"
            "def states():\n    for p in filter(str.isdigit, os.listdir('/proc')):\n        try:\n"
            "            yield open(f'/proc/{p}/stat').read().split()[2]\n        except OSError:\n            pass\n"
            "deadline = time.time() + 10\nwhile time.time() < deadline and 'Z' in states():\n    time.sleep(0.01)\n"
            "print('zombies', list(states()).count('Z'))\nraise SystemExit(42)")
    out, err, status = run_job(admin, py(code))
    assert out == b"zombies 0\n", err
    assert status.exit_code == 42


@needs_root
def test_an_unprivileged_job_cannot_write_where_its_user_cannot(admin, tmp_path):
    target = "/root/jobworker-test-%d" % random.randint(0, 10 ** 9)
    out, err, status = run_job(admin, ["sh", "-c", f"id -u; id -G; echo x > {target}"])
    assert out == b"65534\n65534\n" and status.exit_code != 0 and b"Permission denied" in err
    assert not os.path.exists(target)


@needs_root
def test_jobs_die_with_a_server_killed_outright(pki, tmp_path):
    server = Server(pki, str(tmp_path))
    admin = server.client()
    marker = str(random.randint(10 ** 8, 10 ** 9))
    job_id = admin.start(["sh", "-c", f"sleep {marker} & echo ready; wait"])
    collect_until(admin, job_id, 6)
    pidfds = [os.pidfd_open(pid) for pid in processes_with(marker)]
    assert pidfds
    server.stop(signal.SIGKILL)
    for pidfd in pidfds:
        assert select.select([pidfd], [], [], 30)[0], "a job outlived its server"
        os.close(pidfd)
    assert cgroups_of(server.proc.pid), "nothing to clean up: the test proves nothing"
    again = Server(pki, str(tmp_path / "again"))  # a new server removes what the killed one left
    try:
        assert not cgroups_of(server.proc.pid)
    finally:
        assert again.stop() == 0


@needs_root
def test_isolation_off_runs_jobs_plainly_and_says_so(pki, tmp_path):
    server = Server(pki, str(tmp_path), "--isolation", "off")
    try:
        admin = server.client()
        out, _, status = run_job(admin, py("import os\nprint(os.getppid() > 1, len(os.listdir('/proc')) > 10)"))
        assert out == b"True True\n"
        assert status.isolation.mode == "off" and not status.isolation.namespaces and not status.isolation.cgroup
        assert code_of(lambda: admin.start(["true"], memory_bytes=64 << 20)) == grpc.StatusCode.FAILED_PRECONDITION
        marker = str(random.randint(10 ** 8, 10 ** 9))
        job_id = admin.start(["sh", "-c", f"setsid sh -c 'sleep {marker} & echo daemon'; echo ready; sleep {marker}"])
        collect_until(admin, job_id, len(b"daemon\nready\n"))
        admin.stop(job_id, timeout=5)
        assert processes_with(marker) == [], "without namespaces the init still takes the job's orphans"
    finally:
        assert server.stop() == 0


# A server started with an ambient capability, which no job may keep (where util-linux's setpriv can start one).
AMBIENT_CAPABILITY = (("setpriv", "--inh-caps", "+net_raw", "--ambient-caps", "+net_raw") if shutil.which("setpriv")
                      else ())


@needs_root
def test_isolation_off_inits_run_job_after_job_as_the_job_user_only(pki, tmp_path, gate):
    """Without namespaces or a cgroup, an init that has run a job runs the next: every job under it is nobody, with
    no capability, no way back to root and no way into its init, and nothing a job left running survives into the
    next one. A job can kill or stop its init (they share a user): the job still ends, and nothing of it stays. An
    init that dies while it waits costs no Start."""
    server = Server(pki, str(tmp_path), "--isolation", "off", prefix=AMBIENT_CAPABILITY)
    try:
        admin = server.client()
        nobody = pwd.getpwnam("nobody")
        who = py("import os\n"
                 "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapInh', 'CapPrm', "
                 "'CapEff', 'CapAmb'))]\n"
                 "try:\n    os.setresuid(0, 0, 0)\n    root = 'root again'\n"
                 "except PermissionError:\n    root = 'no root'\n"
                 "try:\n    open(f'/proc/{os.getppid()}/environ').read()\n    init = 'init open'\n"
                 "except PermissionError:\n    init = 'init closed'\n"
                 "print(os.getppid(), *os.getresuid(), *os.getresgid(), os.getgroups(), *caps, root, init)")
        expected = (f"{nobody.pw_uid} " * 3 + f"{nobody.pw_gid} " * 3 +
                    "[] " + "0000000000000000 " * 4 + "no root init closed\n")
        inits, jobs = set(), jobworker.Launcher.KEEP + jobworker.Launcher.POOL + 2
        for _ in range(jobs):  # more than there can be inits, if each ran one job only
            label = marker()
            out, _, status = run_job(admin, ["sh", "-c", f"setsid sleep {label} & exec {shlex.join(who)}"])
            init, rest = out.decode().split(" ", 1)
            assert rest == expected and status.state == pb.EXITED and status.exit_code == 0
            assert processes_with(label) == [], "a job's leftovers end with it, before its init takes another job"
            inits.add(int(init))
        assert len(inits) < jobs, "no init ran a second job"
        # A job that kills its init ends as killed, and what it left running ends too (it holds the job's stdout: the
        # job would not end otherwise).
        label = marker()
        job_id = admin.start(py(gate.hold("") + "import os, subprocess\n"
                                f"subprocess.Popen(['setsid', 'sleep', '{label}'])\nos.kill(os.getppid(), 9)\n"))
        gate.open()  # once its Start has returned
        status = list(admin.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60))[-1].status  # the job's end
        assert status.state == pb.EXITED and status.signal == signal.SIGKILL
        assert processes_with(label) == []
        # A job that stops its init is still ended by a Stop, which kills the init when it does not act.
        job_id = admin.start(py(gate.hold("") + "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n"
                                "print('stopped', flush=True)\n" f"os.execvp('sleep', ['sleep', '{label}'])\n"))
        gate.open()
        collect_until(admin, job_id, len(b"stopped\n"))
        status = admin.stub.Stop(pb.StopRequest(job_id=job_id, force=True), timeout=60)
        assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
        assert processes_with(label) == []
        # Inits that die while they wait for a job cost no Start: each is passed over for another.
        launcher = next(pid for pid in processes_with("jobworker_launcher")
                        if pid in jobworker._children(server.proc.pid))
        waiting = [pid for pid in jobworker._children(launcher) if not jobworker._children(pid)]
        assert waiting
        for pid in waiting:
            pidfd = os.pidfd_open(pid)
            os.kill(pid, signal.SIGKILL)
            assert select.select([pidfd], [], [], 30)[0]
            os.close(pidfd)
        out, _, status = run_job(admin, ["echo", "next"])
        assert out == b"next\n" and status.exit_code == 0
    finally:
        assert server.stop() == 0


@needs_root
@pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/unified/cgroup.procs") and
                    not os.path.exists("/sys/fs/cgroup/cgroup.procs"), reason="no cgroup2 hierarchy")
def test_cgroup_v2_path_places_kills_and_removes_job_groups(pki, tmp_path):
    server = Server(pki, str(tmp_path), "--cgroup", "v2")
    try:
        admin = server.client()
        marker = str(random.randint(10 ** 8, 10 ** 9))
        job_id = admin.start(["sh", "-c", f"setsid sh -c 'sleep {marker} & echo daemon'; echo ready; sleep {marker}"])
        collect_until(admin, job_id, len(b"daemon\nready\n"))
        status = admin.query(job_id)
        assert status.isolation.cgroup == "v2"
        groups = {open(f"/proc/{pid}/cgroup").read().split("0::", 1)[1].split()[0] for pid in processes_with(marker)}
        assert len(groups) == 1
        (cgroup,) = groups
        assert f"/jobworker-{server.proc.pid}/" in cgroup
        group = next(path for path in cgroups_of(server.proc.pid) if path.endswith(cgroup))
        admin.stop(job_id, force=True)
        assert processes_with(marker) == []
        assert not os.path.exists(group)
    finally:
        assert server.stop() == 0


# ---------------------------------------------------------------------------------------------------------------------
# Reliability: load, faults and hostile input
# ---------------------------------------------------------------------------------------------------------------------
#
# What a service that runs other people's commands must survive: load, slow and vanishing clients, jobs that misbehave,
# signals and bad configuration, hostile requests and certificates. Tests that measure the server give it a server of
# their own and read its threads, descriptors and memory from /proc. `make reliability` runs them and prints the
# figures (threads, descriptors and resident memory before, at the peak and after each scenario).
#
# Bounds stated here (MiB = 2^20 bytes):
# - after a scenario the server's threads and descriptors are back to their idle level, exactly (polled for up to
#   SETTLE_SECONDS: the RPC pool lets an idle thread go after 5 s), but for gRPC's own thread pool, which may keep up
#   to GRPC_POOL_SLACK threads more (it sizes itself);
# - its resident memory is back within IDLE_MEMORY_SLACK of idle after a scenario with up to 200 calls at once, and
#   within BURST_MEMORY_SLACK after one with 480 (the allocator keeps some freed memory for reuse: it plateaus after
#   a round or two and does not grow with the number of rounds); a repeated round adds no more than
#   REPEAT_MEMORY_SLACK (a leak of tens of kilobytes per job or per stream would show there);
# - fan-out: 50 clients reading 100 MB each (5 GB sent) raise the server's peak memory by no more than
#   FAN_OUT_MEMORY_BOUND, and by no more than FAN_OUT_SIZE_SLACK above 50 clients reading 10 MB each;
# - a request over jobworker.MAX_REQUEST_BYTES (4 MiB) is refused with RESOURCE_EXHAUSTED and raises the server's
#   peak memory by less than OVERSIZE_MEMORY_SLACK, however large it is.

MiB = 1 << 20
IDLE_MEMORY_SLACK = 64 * MiB
BURST_MEMORY_SLACK = 128 * MiB
REPEAT_MEMORY_SLACK = 24 * MiB
FAN_OUT_MEMORY_BOUND = 160 * MiB
FAN_OUT_SIZE_SLACK = 32 * MiB
OVERSIZE_MEMORY_SLACK = 8 * MiB
SETTLE_SECONDS = 90  # a vanished peer is found out by keepalive (20 s), then its idle thread exits (5 s)
GRPC_POOL = "event_engine"  # the threads of gRPC's own pool, which sizes itself: after a load it lets an idle thread
GRPC_POOL_SLACK = 4         # go after 20 s, but not always within SETTLE_SECONDS (one more than idle after 90 s, seen)


class Figures(collections.namedtuple("Figures", "threads fds rss hwm names", defaults=[()])):
    """A process's threads, open descriptors, resident memory and peak resident memory (bytes), from /proc; and the
    names of its threads (for the message when some are left behind)."""


def figures_of(pid, names=True):
    """Figures of a process; without its threads' names if not asked (PeakWatch samples every few milliseconds)."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    kib = lambda key: int(status[key].split()[0]) * 1024
    tasks = os.listdir(f"/proc/{pid}/task")
    thread_names = []
    for task in tasks if names else ():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/comm") as f:
            thread_names.append(f.read().strip())
    return Figures(len(tasks), len(os.listdir(f"/proc/{pid}/fd")), kib("VmRSS"), kib("VmHWM"), tuple(sorted(thread_names)))


def reset_peak_memory(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux 4.0 and later)


class PeakWatch:
    """The highest threads and descriptors of a process while the block runs (sampled every few milliseconds by a
    thread), and its peak memory (VmHWM, reset when the block starts)."""

    def __init__(self, pid, interval=0.005):
        self.pid, self.interval = pid, interval
        self._done = threading.Event()
        self.threads = self.fds = self.hwm = 0

    def _sample(self):
        figures = figures_of(self.pid, names=False)
        self.threads, self.fds = max(self.threads, figures.threads), max(self.fds, figures.fds)
        self.hwm = max(self.hwm, figures.hwm)

    def _run(self):
        while not self._done.wait(self.interval):
            self._sample()

    def __enter__(self):
        reset_peak_memory(self.pid)
        self.start = figures_of(self.pid, names=False)
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self._sample()

    @property
    def peak(self):
        return Figures(self.threads, self.fds, self.hwm, self.hwm)


def wait_until(condition, timeout=SETTLE_SECONDS, interval=0.05):
    """Polls `condition` until it holds or `timeout` seconds have passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def threads_back(idle, now):
    """Whether `now` has no more threads than `idle`, but for gRPC's own pool, which may keep GRPC_POOL_SLACK more."""
    pool = lambda figures: figures.names.count(GRPC_POOL)
    return now.threads - pool(now) <= idle.threads - pool(idle) and pool(now) <= pool(idle) + GRPC_POOL_SLACK


def settle(server, idle, fds=True):
    """Waits (bounded) until the server has no more threads (and descriptors) than at `idle`; its figures then."""
    pid = server.proc.pid
    wait_until(lambda: (lambda now: threads_back(idle, now) and (not fds or now.fds <= idle.fds))(figures_of(pid)))
    return figures_of(pid)


def idle_server(pki, directory):
    """A server of the test's own, once it has served a call of each kind and is idle again: (server, its figures)."""
    server = Server(pki, directory)
    at_start = figures_of(server.proc.pid)
    client = server.client()
    job_id = client.start(["echo", "warm"])
    collect(client, job_id)
    client.query(job_id)
    client.list()
    client.close()
    idle = settle(server, at_start, fds=False)
    assert threads_back(at_start, idle), f"one call left threads behind: {at_start} -> {idle}"
    return server, idle


def assert_back_to_idle(idle, after, what, memory_slack=IDLE_MEMORY_SLACK):
    assert threads_back(idle, after), \
        f"{what}: threads left behind ({idle.threads} idle: {idle.names}; {after.threads} after: {after.names})"
    assert after.fds <= idle.fds, f"{what}: descriptors left behind ({idle.fds} idle, {after.fds} after)"
    assert after.rss <= idle.rss + memory_slack, \
        f"{what}: memory not given back ({idle.rss / MiB:.0f} MiB idle, {after.rss / MiB:.0f} MiB after)"


def job_groups_left(server_pid, job_ids):
    """The cgroup directories of these (ended) jobs of a server that are still present."""
    return [path for path in cgroups_of(server_pid) if os.path.basename(path) in set(job_ids)]


RELIABILITY_FIGURES = []


def record(scenario, jobs, clients, streamed, before, peak, after):
    RELIABILITY_FIGURES.append((scenario, jobs, clients, streamed, before, peak, after))


@pytest.fixture(scope="module")
def reliability_figures(request):
    """Collects the figures of the scenarios that measure the server, and prints them as a table at the end."""
    yield RELIABILITY_FIGURES
    if not RELIABILITY_FIGURES:
        return
    lines = ["", "Reliability figures (server process; before = idle, peak = during, after = settled; memory is "
                 "VmRSS, peak VmHWM, MiB)", "",
             "| scenario | jobs | clients | bytes streamed | threads before / peak / after "
             "| descriptors before / peak / after | memory MiB before / peak / after |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for scenario, jobs, clients, streamed, before, peak, after in RELIABILITY_FIGURES:
        lines.append(f"| {scenario} | {jobs} | {clients} | {streamed:,} | {before.threads} / {peak.threads} / "
                     f"{after.threads} | {before.fds} / {peak.fds} / {after.fds} | {before.rss / MiB:.0f} / "
                     f"{peak.hwm / MiB:.0f} / {after.rss / MiB:.0f} |")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines))


def open_channel(server, credentials="admin", addr=None):
    """A channel of its own (its own connection, never shared with another channel) and its stub."""
    cert, key = server.pki.roles[credentials] if isinstance(credentials, str) else credentials
    channel = grpc.secure_channel(
        addr or server.addr, jobworker.channel_credentials(cert, key, server.pki._path("ca", "pem")),
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)])
    return channel, jobworker.pb_grpc.JobWorkerStub(channel)


def read_stream(stub, job_id, offset=0, timeout=120, first=None):
    """(stdout, stderr, final status) of a whole stream on a raw stub (no reconnecting), checking that every message
    begins where the previous one ended and that the status comes last; `first` is called after the first message."""
    out, err, status = bytearray(), bytearray(), None
    for message in stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset), timeout=timeout):
        assert status is None, "a message after the final status"
        assert message.offset == offset, f"a gap or a repeat at {offset}: a message at {message.offset}"
        offset += len(message.data)
        (err if message.source == pb.StreamResponse.STDERR else out).extend(message.data)
        if message.HasField("status"):
            status = message.status
        if first:
            first, call = None, first
            call()
    assert status is not None, "the stream ended without the job's final status"
    return bytes(out), bytes(err), status


def digest_stream(stub, job_id, offset=0, timeout=300, first=None, digest=True):
    """(bytes, sha256, final status) of a whole stream, not kept; `first` is called after the first message."""
    digest, size, status = hashlib.sha256() if digest else None, 0, None
    for message in stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset), timeout=timeout):
        assert message.offset == offset + size and status is None
        if digest:
            digest.update(message.data)
        size += len(message.data)
        if message.HasField("status"):
            status = message.status
        if first:
            first, call = None, first
            call()
    return size, digest and digest.hexdigest(), status


def wall_seconds(status):
    return (status.ended_at.ToNanoseconds() - status.started_at.ToNanoseconds()) / 1e9


def marker():
    return str(random.randint(10 ** 8, 10 ** 9))


# -- load --------------------------------------------------------------------------------------------------------------

LOAD_JOBS, LOAD_CHANNELS, LOAD_BLOCK = 200, 20, 32 * 1024
LOAD_ORDER = (1, 2, 1, 2, 2, 1, 1, 2)  # the stream each block goes to: two before the gate, six after
LOAD_JOB = ("import random, sys\nrng = random.Random({seed})\n"
            "streams = {{1: sys.stdout.buffer, 2: sys.stderr.buffer}}\n"
            "def write(fds):\n    for fd in fds:\n"
            "        streams[fd].write(rng.randbytes({size})); streams[fd].flush()\n"
            "write({order}[:2])\n{hold}write({order}[2:])\n")


def load_expected(seed):
    rng = random.Random(seed)
    blocks = [(fd, rng.randbytes(LOAD_BLOCK)) for fd in LOAD_ORDER]
    return b"".join(b for fd, b in blocks if fd == 1), b"".join(b for fd, b in blocks if fd == 2)


def test_reliability_load_200_concurrent_jobs_are_byte_exact_and_leave_nothing(pki, tmp_path, gate,
                                                                              reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    pid = server.proc.pid
    gate.listener.listen(LOAD_JOBS)
    try:
        before, afters = idle, []
        for round_ in (1, 2):
            channels = [open_channel(server) for _ in range(LOAD_CHANNELS)]
            results, go, streaming = {}, threading.Barrier(LOAD_JOBS + 1), threading.Barrier(LOAD_JOBS + 1)

            def client(i):
                try:
                    stub = channels[i % LOAD_CHANNELS][1]
                    go.wait(60)
                    code = LOAD_JOB.format(seed=round_ * 1000 + i, size=LOAD_BLOCK, order=LOAD_ORDER,
                                           hold=gate.hold(""))
                    job_id = stub.Start(pb.StartRequest(command=py(code)), timeout=60).job_id
                    results[i] = read_stream(stub, job_id, first=lambda: streaming.wait(60))
                except BaseException as e:  # reported by the main thread
                    results[i] = e
                    streaming.abort()

            threads = [threading.Thread(target=client, args=(i,)) for i in range(LOAD_JOBS)]
            with PeakWatch(pid) as watch:
                for t in threads:
                    t.start()
                go.wait(60)
                held = [gate.listener.accept()[0] for _ in range(LOAD_JOBS)]  # every job is running, all at once
                streaming.wait(60)  # and every job's stream is open, with its first bytes read
                during = figures_of(pid)
                for connection in held:
                    connection.close()
                for t in threads:
                    t.join(120)
            streamed = 0
            for i in range(LOAD_JOBS):
                assert not isinstance(results.get(i), BaseException) and i in results, (i, results.get(i))
                out, err, status = results[i]
                assert (out, err) == load_expected(round_ * 1000 + i), f"job {i}: output differs"
                assert status.state == pb.EXITED and status.exit_code == 0 and status.output_bytes == len(out + err)
                streamed += len(out) + len(err)
            for channel, _ in channels:
                channel.close()
            after = settle(server, idle)
            record(f"load, round {round_}: {LOAD_JOBS} jobs started at once, each streamed", LOAD_JOBS,
                   f"{LOAD_JOBS} threads on {LOAD_CHANNELS} connections", streamed, before, watch.peak, after)
            assert during.threads > LOAD_JOBS, "the jobs' streams were not all open at once"
            assert_back_to_idle(idle, after, f"load round {round_}")
            assert not job_groups_left(pid, [status.job_id for _, _, status in results.values()])
            afters.append(after)
            before = after
        assert afters[1].rss <= afters[0].rss + REPEAT_MEMORY_SLACK, \
            f"a second round of {LOAD_JOBS} jobs kept {(afters[1].rss - afters[0].rss) / MiB:.0f} MiB more"
    finally:
        assert server.stop() == 0, server.read_log()


# -- fan-out -----------------------------------------------------------------------------------------------------------

def test_reliability_fan_out_50_clients_of_one_100_mb_job_in_bounded_memory(pki, tmp_path, gate, reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    pid, clients, growth = server.proc.pid, 50, {}
    try:
        for blocks in (10, 100):  # MB each client reads: the bound must not depend on it
            channels = [open_channel(server) for _ in range(clients)]
            job_id = channels[0][1].Start(pb.StartRequest(command=py(
                gate.hold() + PATTERN_JOB.format(blocks=blocks, size=1 << 20))), timeout=60).job_id
            attached, results = threading.Barrier(clients + 1), [None] * clients

            def reader(i):
                try:
                    results[i] = digest_stream(channels[i][1], job_id, first=lambda: attached.wait(60))
                except BaseException as e:
                    results[i] = e

            threads = [threading.Thread(target=reader, args=(i,)) for i in range(clients)]
            with PeakWatch(pid) as watch:
                for t in threads:
                    t.start()
                attached.wait(60)  # every client has its first bytes while the job is still held
                gate.open()
                for t in threads:
                    t.join(300)
            expected = b"ready\n" + pattern(blocks)
            whole = (len(expected), hashlib.sha256(expected).hexdigest())
            for i, result in enumerate(results):
                assert isinstance(result, tuple), (i, result)
                assert result[:2] == whole and result[2].exit_code == 0, f"client {i}: {result[0]} bytes"
            for channel, _ in channels:
                channel.close()
            growth[blocks] = watch.peak.hwm - idle.rss
        after = settle(server, idle)
        record(f"fan-out: {clients} clients stream one job of 100 MB", 1, clients, clients * len(expected), idle,
               watch.peak, after)
        assert growth[100] <= FAN_OUT_MEMORY_BOUND, f"peak memory grew by {growth[100] / MiB:.0f} MiB"
        assert growth[100] <= growth[10] + FAN_OUT_SIZE_SLACK, \
            f"peak memory grows with output size: {growth[10] / MiB:.0f} MiB for 10 MB, {growth[100] / MiB:.0f} for 100"
        assert_back_to_idle(idle, after, "fan-out")
    finally:
        assert server.stop() == 0, server.read_log()


# -- slow and vanishing clients ----------------------------------------------------------------------------------------

class PausableProxy(CuttableProxy):
    """A TCP proxy on loopback that can stop relaying what the server sends: the server's socket then fills up, as it
    would for a client that stops reading altogether."""

    def __init__(self, target):
        self.flowing = threading.Event()
        self.flowing.set()
        super().__init__(target)

    def _before_sending(self, from_server):
        if from_server:
            self.flowing.wait()

    def close(self):
        """Goes away as a client process that dies does: its sockets closed with unread data, so the server gets a
        reset (a shutdown alone leaves the server to time the silent connection out, about 20 s later)."""
        connections = list(self.connections)
        self.flowing.set()
        super().close()
        for s in connections:
            s.close()


def test_reliability_clients_that_stop_reading_slow_neither_the_job_nor_other_clients(pki, tmp_path, gate,
                                                                                      reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    pid, blocks = server.proc.pid, 200
    code = gate.hold() + PATTERN_JOB.format(blocks=blocks, size=1 << 20)
    expected = b"ready\n" + pattern(blocks)
    channel, stub = open_channel(server)
    try:
        alone_id = stub.Start(pb.StartRequest(command=py(code)), timeout=60).job_id  # the same job with no stuck client
        next(iter(stub.Stream(pb.StreamRequest(job_id=alone_id), timeout=60)))
        gate.open()
        size, digest, alone = digest_stream(stub, alone_id)
        assert (size, digest) == (len(expected), hashlib.sha256(expected).hexdigest())

        job_id = stub.Start(pb.StartRequest(command=py(code)), timeout=60).job_id
        proxy, stuck = PausableProxy(server.addr), []
        with PeakWatch(pid) as watch:
            for addr in (None,) * 3 + (proxy.addr,) * 3:  # 3 stop asking for messages, 3 stop reading the socket
                stuck_channel, stuck_stub = open_channel(server, addr=addr)
                call = stuck_stub.Stream(pb.StreamRequest(job_id=job_id), timeout=300)
                assert next(call).data == b"ready\n"
                stuck.append((stuck_channel, call))
            proxy.flowing.clear()
            gate.open()
            started = time.monotonic()
            size, digest, status = digest_stream(stub, job_id)  # another client reads it all, meanwhile
            reading = time.monotonic() - started
            listing = time.monotonic()
            stub.List(pb.ListRequest(), timeout=10)
            listing = time.monotonic() - listing
        assert (size, digest) == (len(expected), hashlib.sha256(expected).hexdigest())
        assert status.state == pb.EXITED and status.exit_code == 0, "the job ended while six clients read nothing"
        assert wall_seconds(status) <= 2 * wall_seconds(alone) + 2, (wall_seconds(status), wall_seconds(alone))
        assert reading <= 2 * wall_seconds(alone) + 5 and listing < 2
        assert watch.hwm - watch.start.rss <= 64 * MiB, \
            f"unread output is held in the server's memory: {(watch.hwm - watch.start.rss) / MiB:.0f} MiB"
        for stuck_channel, call in stuck:
            call.cancel()
            stuck_channel.close()
        proxy.close()
        channel.close()
        after = settle(server, idle)
        record(f"stuck clients: 6 stop reading a {blocks} MB job, 1 reads it", 2, 7, 2 * size, idle, watch.peak, after)
        assert_back_to_idle(idle, after, "stuck clients")
    finally:
        channel.close()
        assert server.stop() == 0, server.read_log()


PARTIAL_CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + bytes(16)  # announces 200 bytes, sends 27


def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_partial_call(method="Stream"):
    """An HTTP/2 connection preface, then a gRPC call's headers and the first byte of a 100-byte request."""
    fields = ((b":method", b"POST"), (b":scheme", b"https"), (b":path", f"/jobworker.v1.JobWorker/{method}".encode()),
              (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers"))
    headers = b"".join(b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v for n, v in fields)  # HPACK literals
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0) + h2_frame(1, 4, 1, headers) +
            h2_frame(0, 0, 1, b"\x00\x00\x00\x00\x64\x0a"))


def vanish_at_the_transport(server, how, context):
    """One client that goes away during its connection: at once, mid-TLS-handshake, after it, or mid-request."""
    host, port = server.addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    try:
        if how == "hello":
            sock.sendall(PARTIAL_CLIENT_HELLO)
        elif how in ("tls", "request"):
            sock = context.wrap_socket(sock, server_hostname="localhost")
            if how == "request":
                sock.sendall(h2_partial_call())
    finally:
        sock.close()


def test_reliability_hundreds_of_vanishing_clients_leave_nothing_behind(pki, tmp_path, gate, reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    pid = server.proc.pid
    per_caller = (jobworker.Server.WORKERS - jobworker.Server.RESERVED) // 2
    cert, key = pki.roles["admin"]
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki._path("ca", "pem"))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    admin_channel, admin = open_channel(server)
    vanished = collections.Counter()
    try:
        code = "import sys\nsys.stdout.write('x' * 100000); sys.stdout.flush()\n" + gate.hold("")
        job_id = admin.Start(pb.StartRequest(command=py(code)), timeout=60).job_id
        first = admin.Stream(pb.StreamRequest(job_id=job_id, offset=99999), timeout=60)
        assert next(first).data == b"x"
        first.cancel()
        base = settle(server, idle, fds=False)  # idle, with the job and the admin's connection open

        def fill_every_stream_slot():
            """Opens as many streams as one caller may (all must open), checks the next is refused, closes them."""
            channel, stub = open_channel(server)
            calls = []
            try:
                for _ in range(per_caller):
                    calls.append(stub.Stream(pb.StreamRequest(job_id=job_id), timeout=120))
                    next(calls[-1])
                refused = stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60)
                assert code_of(lambda: next(refused)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            finally:
                for call in calls:
                    call.cancel()
                channel.close()
            return len(calls)

        for _ in range(2):  # also brings memory to its working level for that many streams (a plateau after two)
            assert fill_every_stream_slot() == per_caller
        warmed = settle(server, base)
        assert_back_to_idle(base, warmed, f"{per_caller} streams closed by their client", BURST_MEMORY_SLACK)
        with PeakWatch(pid) as watch:
            for round_ in range(4):
                proxy, calls = CuttableProxy(server.addr), []
                shared = {mode: open_channel(server) for mode in ("cancel", "deadline")}
                for mode in ("cancel", "deadline", "close", "cut") * 30:
                    channel, stub = shared[mode] if mode in shared else \
                        open_channel(server, addr=proxy.addr if mode == "cut" else None)
                    call = stub.Stream(pb.StreamRequest(job_id=job_id), timeout=2 if mode == "deadline" else 60)
                    with contextlib.suppress(grpc.RpcError):  # a deadline may pass before the first message
                        next(call)
                    calls.append((mode, channel, call))
                for mode, channel, call in calls:
                    if mode == "cancel":
                        call.cancel()
                    elif mode == "close":
                        channel.close()
                proxy.cut()  # as if the client's machine went away: no HTTP/2 goodbye
                for mode, channel, call in calls:
                    assert code_of(lambda: list(call)) != OK, mode
                    vanished[mode] += 1
                for _, channel, _ in calls:
                    channel.close()
                for channel, _ in shared.values():
                    channel.close()
                proxy.close()
                for how in ("connect", "hello", "tls", "request") * 25:
                    vanish_at_the_transport(server, how, context)
                    vanished[f"transport {how}"] += 1
                if round_ == 1:  # the allocator's level for this workload, once it has seen it twice
                    plateau = settle(server, base)
            repeated = settle(server, base)
            assert repeated.rss <= plateau.rss + REPEAT_MEMORY_SLACK, "vanishing clients: two more rounds grew memory " \
                f"from {plateau.rss / MiB:.0f} MiB to {repeated.rss / MiB:.0f} MiB"
            # Clients that vanish in the middle of a unary call: Stops waiting out a job that ignores SIGTERM.
            stubborn = admin.Start(pb.StartRequest(command=py(
                "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                "signal.pause()\n")), timeout=60).job_id
            reading = admin.Stream(pb.StreamRequest(job_id=stubborn), timeout=60)
            assert next(reading).data == b"ready\n"
            reading.cancel()
            quiet = settle(server, base, fds=False)
            stoppers = [open_channel(server) for _ in range(20)]
            futures = [stub.Stop.future(pb.StopRequest(job_id=stubborn, timeout_seconds=600), timeout=120)
                       for _, stub in stoppers]
            assert wait_until(lambda: figures_of(pid).threads >= quiet.threads + len(stoppers)), \
                "the Stop calls never reached the server"
            for channel, _ in stoppers:
                channel.close()
            for future in futures:
                assert code_of(future.result) == grpc.StatusCode.CANCELLED
                vanished["mid-Stop"] += 1
            assert admin.Stop(pb.StopRequest(job_id=stubborn, force=True), timeout=60).signal == signal.SIGKILL
            assert fill_every_stream_slot() == per_caller, "a vanished client's stream slot was never given back"
            after = settle(server, base)
        assert_back_to_idle(warmed, after, "vanishing clients", memory_slack=BURST_MEMORY_SLACK)
        gate.open()
        read_stream(admin, job_id)
        admin_channel.close()
        after = settle(server, idle)
        total = sum(vanished.values())
        record(f"vanishing: {total} clients go away mid-stream or mid-call", 2, total, 0, idle, watch.peak, after)
        assert_back_to_idle(idle, after, "vanishing clients", BURST_MEMORY_SLACK)
        assert not job_groups_left(pid, [job_id, stubborn])
        assert "Traceback" not in server.read_log()
    finally:
        admin_channel.close()
        assert server.stop() == 0, server.read_log()


# -- faults in jobs ----------------------------------------------------------------------------------------------------

def test_reliability_a_job_that_closes_its_output_early_ends_its_stream_only_when_it_ends(admin, gate):
    code = ("import os, sys\nprint('early', flush=True)\nos.close(1)\nsys.stderr.write('late\\n'); sys.stderr.flush()\n"
            "os.close(2)\n" + gate.hold("") + "raise SystemExit(3)\n")
    job_id = admin.start(py(code))
    streaming = admin.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60)
    got = bytearray()
    while len(got) < len(b"early\nlate\n"):
        got += next(streaming).data
    assert admin.query(job_id).state == pb.RUNNING  # both pipes are closed, and the job goes on
    gate.open()
    rest = list(streaming)
    assert rest and rest[-1].status.exit_code == 3, "the stream ended before the job"
    assert b"".join(m.data for m in rest) == b""
    out, err, status = read_stream(admin.stub, job_id)
    assert (out, err, status.state, status.exit_code) == (b"early\n", b"late\n", pb.EXITED, 3)


def test_reliability_output_without_newlines_arrives_live_and_byte_exact(admin, gate):
    count = 20000  # single-byte writes, alternating stdout and stderr: 20000 runs in the log's index
    code = ("import os\nos.write(1, b'abc')\n" + gate.hold("") +
            f"for i in range({count}):\n    os.write(1 + i % 2, bytes([i % 251]))\n")
    job_id = admin.start(py(code))
    streaming = admin.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60)
    assert next(streaming).data == b"abc", "output without a newline waits for one"
    gate.open()
    out, err, status = read_stream(admin.stub, job_id)
    assert out == b"abc" + bytes(i % 251 for i in range(0, count, 2))
    assert err == bytes(i % 251 for i in range(1, count, 2))
    assert status.exit_code == 0 and status.output_bytes == count + 3
    for offset in (1, 3, 4, 5, count // 2 + 1, count + 2, count + 3):
        tail_out, tail_err, _ = read_stream(admin.stub, job_id, offset)
        assert len(tail_out) + len(tail_err) == count + 3 - offset
        assert out.endswith(tail_out) and err.endswith(tail_err)


def test_reliability_a_job_writing_gigabytes_streams_them_all_in_bounded_time_and_memory(pki, tmp_path,
                                                                                        reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    size = (2 << 30) + (1 << 20)  # past 2^31: offsets beyond any 32-bit integer
    channel, stub = open_channel(server)
    try:
        started = time.monotonic()
        job_id = stub.Start(pb.StartRequest(command=["sh", "-c", f"head -c {size} /dev/zero; printf END"]),
                            timeout=60).job_id
        with PeakWatch(server.proc.pid) as watch:
            streamed, _, status = digest_stream(stub, job_id, timeout=120, digest=False)
        elapsed = time.monotonic() - started
        assert streamed == size + 3 and status.exit_code == 0 and status.output_bytes == size + 3
        assert elapsed < 60, f"{size + 3} bytes took {elapsed:.0f} s"
        out, _, _ = read_stream(stub, job_id, size - 2)
        assert out == b"\0\0END"
        assert code_of(lambda: read_stream(stub, job_id, 1 << 32)) == grpc.StatusCode.OUT_OF_RANGE
        growth = watch.hwm - watch.start.rss
        assert growth <= 64 * MiB, f"{growth / MiB:.0f} MiB for {size} bytes"
        channel.close()
        after = settle(server, idle)
        record("gigabytes: one job writes 2 GiB + 1 MiB, one client streams it", 1, 1, streamed, idle, watch.peak,
               after)
        assert_back_to_idle(idle, after, "a job writing gigabytes")
    finally:
        channel.close()
        assert server.stop() == 0, server.read_log()
        shutil.rmtree(server.data_dir, ignore_errors=True)  # the 2 GiB log


def test_reliability_a_job_with_hundreds_of_children_stops_entirely(admin):
    mark = marker()
    job_id = admin.start(["sh", "-c", f"for i in $(seq 300); do sleep {mark} & done; echo ready; wait"])
    collect_until(admin, job_id, 6)
    assert len(processes_with(mark)) >= 300
    status = admin.stop(job_id, timeout=10)
    assert status.state == pb.STOPPED and status.signal == signal.SIGTERM
    assert processes_with(mark) == []
    assert read_stream(admin.stub, job_id)[2].state == pb.STOPPED


@needs_root
def test_reliability_a_fork_bomb_that_ignores_sigterm_is_contained_and_stopped(admin):
    mark = marker()
    code = (f"# {mark}\nimport os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    job_id = admin.start(py(code), pids=64)
    collect_until(admin, job_id, 6)
    assert wait_until(lambda: len(processes_with(mark)) >= 64, timeout=30), "the bomb did not reach its limit"
    assert len(processes_with(mark)) <= 64
    started = time.monotonic()
    assert code_of(admin.list) == OK  # the server still serves, with every process of the job spinning
    status = admin.stop(job_id, timeout=0.5)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    assert time.monotonic() - started < 30
    assert processes_with(mark) == []
    assert read_stream(admin.stub, job_id)[2].state == pb.STOPPED


def test_reliability_a_job_that_exits_while_its_children_live_on_ends_with_them(admin):
    mark = marker()
    code = (f"# {mark}\nimport os, signal, sys\n"
            "for _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
            "            signal.signal(s, signal.SIG_IGN)\n"
            "        while True:\n            os.write(1, b'child\\n')\n"
            "print('parent leaves', flush=True)\n")
    out, err, status = read_stream(admin.stub, admin.start(py(code)))
    assert status.state == pb.EXITED and status.exit_code == 0 and status.output_bytes == len(out) + len(err)
    assert b"parent leaves\n" in out and set(out.split(b"\n")) <= {b"child", b"parent leaves", b""}, out[-200:]
    assert processes_with(mark) == [], "a child outlived its job"


def test_reliability_a_job_whose_processes_all_ignore_sigterm_and_write_is_stopped(admin):
    mark = marker()
    code = (f"# {mark}\nimport os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "for _ in range(3):\n    os.fork()\n"  # eight writers
            "import time\nprint('ready', flush=True)\n"
            "while True:\n    os.write(1, b'x' * 4096)\n    time.sleep(0.001)\n")
    job_id = admin.start(py(code))
    collect_until(admin, job_id, 1 << 20)
    reader = {}
    thread = threading.Thread(target=lambda: reader.update(result=digest_stream(admin.stub, job_id)))
    thread.start()
    started = time.monotonic()
    status = admin.stop(job_id, timeout=0.5)
    assert time.monotonic() - started < 30
    thread.join(60)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    size, _, final = reader["result"]
    assert final.state == pb.STOPPED and size == final.output_bytes == status.output_bytes
    assert processes_with(mark) == []


def test_reliability_a_job_that_stops_itself_can_be_queried_streamed_and_stopped(admin):
    mark = marker()
    job_id = admin.start(["sh", "-c", f"sleep {mark} & echo ready; kill -STOP 0; echo resumed; wait"])
    collect_until(admin, job_id, 6)
    status = admin.query(job_id)

    def stopped(pid):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    assert wait_until(lambda: all(stopped(p) for p in processes_with(mark) + [status.pid]), timeout=30)
    assert admin.query(job_id).state == pb.RUNNING
    streaming = admin.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60)
    assert next(streaming).data == b"ready\n"
    started = time.monotonic()
    status = admin.stop(job_id, timeout=20)
    assert status.state == pb.STOPPED and status.signal == signal.SIGTERM, "SIGTERM did not reach the stopped job"
    assert time.monotonic() - started < 20
    rest = list(streaming)
    assert rest and rest[-1].status.state == pb.STOPPED and b"".join(m.data for m in rest) == b""
    assert processes_with(mark) == []


# -- server faults -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_reliability_server_signal_with_jobs_running_and_streams_open_exits_cleanly(pki, tmp_path, gate, sig):
    server = Server(pki, str(tmp_path))
    pid, mark = server.proc.pid, marker()
    channel, stub = open_channel(server)
    try:
        jobs = {
            "writer": ["sh", "-c", f"echo ready; while :; do echo {mark}; done"],
            "stopped": ["sh", "-c", f"sleep {mark} & echo ready; kill -STOP 0; wait"],
            "stubborn": py(f"# {mark}\nimport os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                           f"os.fork()\nprint('ready', flush=True)\ntime.sleep({mark})"),
            "held": py(f"# {mark}\n" + gate.hold()),
        }
        ids = {name: stub.Start(pb.StartRequest(command=command), timeout=60).job_id for name, command in jobs.items()}
        readers, results = [], {}
        attached = threading.Barrier(len(ids) * 2 + 1)

        def read(name, job_id, offset):
            reader_channel, reader_stub = open_channel(server)
            try:
                results[name, offset] = read_until_the_end(reader_stub, job_id, offset, attached)
            finally:
                reader_channel.close()

        for name, job_id in ids.items():
            for offset in (0, 5):  # from the start; and from the last byte of "ready\n", then waiting for more
                readers.append(threading.Thread(target=read, args=(name, job_id, offset)))
        for t in readers:
            t.start()
        attached.wait(60)  # every stream has had its first message
        stopping = stub.Stop.future(pb.StopRequest(job_id=ids["stubborn"], timeout_seconds=600), timeout=120)
        started = time.monotonic()
        server.proc.send_signal(sig)
        code = server.proc.wait(60)
        took = time.monotonic() - started
        for t in readers:
            t.join(60)
        assert code == 0, server.read_log()
        assert took < jobworker.SHUTDOWN_GRACE + 10, f"shutdown took {took:.1f} s"
        assert processes_with(mark) == [], "a job outlived its server"
        assert not cgroups_of(pid), "a cgroup outlived its server"
        log = server.read_log()
        assert f"{signal.Signals(sig).name}: stopping every job" in log and "Traceback" not in log, log[-2000:]
        assert code_of(lambda: stopping.result(60)) in (OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert len(results) == len(ids) * 2, "a stream never ended"
        for (name, offset), (size, status, error) in results.items():
            assert error in (None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (name, offset, error)
            if error is None:
                assert status is not None and status.state == pb.STOPPED, (name, offset, status)
                assert size == status.output_bytes - offset, f"{name}: {size} of {status.output_bytes - offset} bytes"
    finally:
        channel.close()
        server.stop()


def read_until_the_end(stub, job_id, offset, attached):
    """(bytes read, final status or None, error code or None) of a stream that the server's shutdown ends; passes
    `attached` after its first message."""
    size, status, waiting = 0, None, False
    try:
        for message in stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset), timeout=120):
            size += len(message.data)
            if message.HasField("status"):
                status = message.status
            if not waiting:
                waiting = True
                attached.wait(60)
    except grpc.RpcError as e:
        return size, status, e.code()
    return size, status, None


def test_reliability_a_server_with_bad_configuration_exits_at_once_with_a_clear_message(pki, tmp_path):
    cert, key = pki.server
    ca = pki._path("ca", "pem")
    files = tmp_path / "files"
    files.mkdir()
    (files / "garbage.pem").write_text("not a certificate\n")
    (files / "empty.pem").write_text("")
    (files / "dir.pem").mkdir()
    unreadable = {}
    for name, source in (("cert", cert), ("key", key), ("ca", ca)):
        unreadable[name] = files / f"unreadable-{name}.pem"
        shutil.copy(source, unreadable[name])
        os.chmod(unreadable[name], 0)
    (files / "a-file").write_text("")
    good = {"cert": cert, "key": key, "ca": ca}

    libc = ctypes.CDLL(None, use_errno=True)

    def drop_file_capabilities():  # root reads any file; without CAP_DAC_OVERRIDE/READ_SEARCH, a mode 000 one no more
        for capability in (1, 2):
            libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP

    def serve(what, *, data=None, addr="127.0.0.1:0", capabilities=True, names=(), **paths):
        """Starts a server that must refuse to; returns a problem with it, or None."""
        argv = [sys.executable, JOBWORKER, "serve", "--addr", addr, "--data-dir", str(data or tmp_path / "data")]
        for name, path in dict(good, **paths).items():
            argv += [f"--{name}", str(path)]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   preexec_fn=None if capabilities or not ROOT else drop_file_capabilities)
        ready, _, _ = select.select([process.stdout], [], [], 20)
        if ready and process.stdout.readline().startswith(b"listening"):
            process.terminate()
            process.communicate(timeout=60)
            return f"{what}: the server started"
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return f"{what}: the server neither started nor exited"
        message = err.decode(errors="replace").strip()
        expected = [str(p) for p in paths.values()] + list(names) or [str(data or addr)]
        if process.returncode == 0 or "Traceback" in message or len(message.splitlines()) > 8:
            return f"{what}: exit {process.returncode}: {message[-300:]!r}"
        if not any(e in message for e in expected):
            return f"{what}: the message does not name {' or '.join(expected)}: {message[-300:]!r}"
        return None

    problems = [
        serve("unreadable certificate", capabilities=False, cert=unreadable["cert"]),
        serve("unreadable key", capabilities=False, key=unreadable["key"]),
        serve("unreadable CA", capabilities=False, ca=unreadable["ca"]),
        serve("certificate is a directory", cert=files / "dir.pem"),
        serve("certificate is not PEM", cert=files / "garbage.pem"),
        serve("key is not PEM", key=files / "garbage.pem"),
        serve("CA is not PEM", ca=files / "garbage.pem"),
        serve("empty certificate", cert=files / "empty.pem"),
        serve("empty key", key=files / "empty.pem"),
        serve("empty CA", ca=files / "empty.pem"),
        serve("certificate and key swapped", cert=key, key=cert),
        serve("the key of another certificate", key=pki.roles["admin"][1], names=[cert]),
        serve("data directory is a file", data=files / "a-file"),
        serve("data directory on a read-only file system", data="/sys/kernel/jobworker"),
        serve("port out of range", addr="127.0.0.1:99999"),
    ]
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


# -- hostile input -----------------------------------------------------------------------------------------------------

SAFE_PROGRAMS = {"true", "echo"}  # what generated commands may run (names that would run anything else are left out)
METHODS = ("Start", "Stop", "Query", "Stream", "List")
REQUEST_TYPES = {"Start": pb.StartRequest, "Stop": pb.StopRequest, "Query": pb.QueryRequest,
                 "Stream": pb.StreamRequest, "List": pb.ListRequest}
INVALID, NOT_FOUND, RESOURCE_EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                          grpc.StatusCode.RESOURCE_EXHAUSTED)
HOSTILE = settings(deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])


def resolve_program(name):
    """The file a job's exec would run for `name` (its PATH, its working directory /), or None."""
    candidates = [os.path.join("/", name)] if "/" in name else \
        [os.path.join(d, name) for d in jobworker.JOB_PATH.split(":")]
    for path in candidates:
        with contextlib.suppress(ValueError, OSError):
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def harmless(name):
    found = "\0" not in name and resolve_program(name)
    return not found or os.path.basename(found) in SAFE_PROGRAMS


TEXT = st.text(st.characters(codec="utf-8"), max_size=30)  # any unicode ('\0' too) but lone surrogates: not UTF-8
ODD_TEXT = st.sampled_from(["", " ", "\0", "a\0b", "é", "😀", "\u202e", "\n", "-n", "%s%n", "../../etc", "x" * 200])
PROGRAMS = st.one_of(st.sampled_from(["true", "/bin/true", "echo", "bin/echo", "", " ", "/", "/etc/passwd",
                                      "/no/such/program", "no-such-program", "é", "\0"]), TEXT.filter(harmless))
ARGUMENTS = st.one_of(TEXT, ODD_TEXT, st.integers(0, 6 * MiB).map(lambda n: "a" * n))
COMMANDS = st.one_of(
    st.lists(st.one_of(TEXT, ODD_TEXT), max_size=3),                                     # no sane program at all
    st.builds(lambda p, args: [p] + args, PROGRAMS, st.lists(ARGUMENTS, max_size=6)),
    st.builds(lambda p, n: [p] + [""] * n, PROGRAMS, st.integers(0, 400_000)),          # huge argv
    st.builds(lambda p, n, arg: [p] + [arg] * n, PROGRAMS, st.integers(0, 40), st.sampled_from(["y" * 100_000])),
)
CORES = st.one_of(st.just(0.0), st.floats(), st.sampled_from(
    [-0.0, 5e-324, 1e-9, 0.001, 0.5, float(os.cpu_count()), os.cpu_count() + 1e-9, -1.0, 1e308, math.inf, -math.inf,
     math.nan]))
U64 = st.one_of(st.just(0), st.integers(0, 2 ** 64 - 1), st.sampled_from(
    [1, 4 * MiB - 1, 4 * MiB, 64 * MiB, 32768, 32769, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64 - 1]))
LIMITS = st.one_of(st.just(pb.Limits()), st.builds(pb.Limits, cpu_cores=CORES, memory_bytes=U64, io_read_bps=U64,
                                                   io_write_bps=U64, pids=U64))
JOB_IDS = st.one_of(
    TEXT, ODD_TEXT, st.sampled_from(["@running", "@ended"]),
    st.uuids().map(str),                                         # well formed, but no such job
    st.uuids().map(lambda u: str(u).upper()), st.uuids().map(lambda u: u.hex), st.uuids().map(lambda u: f"{{{u}}}"),
    st.uuids().map(lambda u: f" {u}"), st.uuids().map(lambda u: f"{u}\n"), st.uuids().map(lambda u: f"{u}\0"),
    st.integers(0, 6 * MiB).map(lambda n: "j" * n),              # up to 6 MiB: beyond the 4 MiB request limit
)
TIMEOUTS = st.one_of(st.none(), st.floats(), st.sampled_from(
    [0.0, -0.0, 5e-324, 0.001, 1.0, 3600.0, 3600.000001, -1.0, 1e308, math.inf, -math.inf, math.nan]))
OFFSETS = st.one_of(st.integers(0, 16), st.integers(0, 2 ** 64 - 1), st.sampled_from(
    [2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]))


def raw_call(channel, method, data):
    """The status code of `method` called with raw request bytes (a stream is read to its end)."""
    if method == "Stream":
        call = channel.unary_stream(f"/jobworker.v1.JobWorker/{method}")
        return status_of(lambda: list(call(data, timeout=60)))[0]
    call = channel.unary_unary(f"/jobworker.v1.JobWorker/{method}")
    return status_of(lambda: call(data, timeout=60))[0]


def status_of(call):
    """The status code of a call (and its response, if it succeeded)."""
    try:
        return OK, call()
    except grpc.RpcError as e:
        assert e.details(), f"{e.code()} without a message"
        return e.code(), None


class Hostile:
    """A server of this module's own for hostile requests, with jobs the requests can name."""

    def __init__(self, pki, directory):
        self.server = Server(pki, directory)
        self.channel, self.stub = open_channel(self.server)
        self.held = Gate()
        self.running = self.stub.Start(pb.StartRequest(command=py(self.held.hold())), timeout=60).job_id
        assert next(iter(self.stub.Stream(pb.StreamRequest(job_id=self.running), timeout=60))).data == b"ready\n"
        self.ended = self.stub.Start(pb.StartRequest(command=["sh", "-c", "printf abc; printf DEF >&2; printf ghi"]),
                                     timeout=60).job_id
        self.ended_output = [(m.source, m.data) for m in self.stub.Stream(pb.StreamRequest(job_id=self.ended),
                                                                          timeout=60) if m.data]
        self.unavailable = set()  # limits this server cannot enforce (FAILED_PRECONDITION when asked for)
        for name in jobworker.LIMITS:
            value = 0.5 if name == "cpu_cores" else (64 * MiB if name == "memory_bytes" else 100)
            code, response = status_of(lambda: self.stub.Start(pb.StartRequest(
                command=["true"], limits=pb.Limits(**{name: value})), timeout=60))
            assert code in (OK, grpc.StatusCode.FAILED_PRECONDITION), (name, code)
            if code != OK:
                self.unavailable.add(name)

    def job_id(self, text):
        return {"@running": self.running, "@ended": self.ended}.get(text, text)

    def still_serves(self):
        assert status_of(lambda: self.stub.List(pb.ListRequest(), timeout=30))[0] == OK, "List fails after the request"

    def close(self):
        self.channel.close()
        with contextlib.suppress(socket.timeout):
            self.held.open()
        self.held.close()
        assert self.server.stop() == 0, self.server.read_log()
        assert not cgroups_of(self.server.proc.pid)


@pytest.fixture(scope="module")
def hostile(pki, tmp_path_factory):
    hostile = Hostile(pki, str(tmp_path_factory.mktemp("hostile")))
    yield hostile
    hostile.close()


def id_outcome(hostile, request, job_id):
    """What a request naming `job_id` must get before anything else about it is looked at."""
    if request.ByteSize() > jobworker.MAX_REQUEST_BYTES:
        return {RESOURCE_EXHAUSTED}
    if job_id in (hostile.running, hostile.ended):
        return {OK}
    try:
        canonical = str(uuid.UUID(job_id)) == job_id
    except ValueError:
        canonical = False
    return {NOT_FOUND} if canonical else {INVALID}


def start_outcome(hostile, request):
    if request.ByteSize() > jobworker.MAX_REQUEST_BYTES:
        return {RESOURCE_EXHAUSTED}
    command, limits = list(request.command), request.limits
    if not command or not command[0] or any("\0" in arg for arg in command):
        return {INVALID}
    cores = limits.cpu_cores
    invalid = (not math.isfinite(cores) or cores < 0 or cores > os.cpu_count() or limits.memory_bytes > jobworker._memory_total()
               or 0 < limits.memory_bytes < 4 * MiB or limits.pids > 32768)
    unavailable = any(getattr(limits, name) for name in hostile.unavailable)
    if invalid or unavailable:
        return ({INVALID} if invalid else set()) | ({grpc.StatusCode.FAILED_PRECONDITION} if unavailable else set())
    if not resolve_program(command[0]):
        return {INVALID}
    sizes = [len(arg.encode()) + 1 for arg in command]
    total = sum(sizes) + 8 * len(command)
    if max(sizes) > 128 * 1024 or total > 2 * MiB:
        return {INVALID}  # E2BIG: the kernel refuses it
    return {OK, INVALID} if total > 1.5 * MiB else {OK}


@settings(HOSTILE, max_examples=60)
@given(command=COMMANDS, limits=LIMITS)
@example(command=["echo", "x" * (128 * 1024 - 1)], limits=pb.Limits())     # the longest argument the kernel takes
@example(command=["echo", "x" * (128 * 1024)], limits=pb.Limits())
@example(command=["true", "x" * (4 * MiB)], limits=pb.Limits())             # just over the request limit
@example(command=["true"], limits=pb.Limits(memory_bytes=4 * MiB, pids=1, cpu_cores=5e-324))
def test_reliability_hostile_start_requests(hostile, command, limits):
    request = pb.StartRequest(command=command, limits=limits)
    allowed = start_outcome(hostile, request)
    code, response = status_of(lambda: hostile.stub.Start(request, timeout=60))
    if code == OK:
        assert list(response.status.command) == command and response.status.owner == "ada"
        hostile.stub.Stop(pb.StopRequest(job_id=response.job_id, force=True), timeout=60)
    assert code in allowed, (code, allowed, [a[:40] for a in command[:5]], len(command), limits)
    hostile.still_serves()


@settings(HOSTILE, max_examples=40)
@given(job_id=JOB_IDS, force=st.booleans(), timeout=TIMEOUTS)
@example(job_id="@running", force=False, timeout=3600.0)
@example(job_id="@running", force=True, timeout=math.nan)
def test_reliability_hostile_stop_requests(hostile, job_id, force, timeout):
    if job_id == "@running":  # a job of its own, that this request may end
        job_id = hostile.stub.Start(pb.StartRequest(command=["sleep", "600"]), timeout=60).job_id
        own = job_id
    else:
        job_id, own = hostile.job_id(job_id), None
    request = pb.StopRequest(job_id=job_id, force=force)
    if timeout is not None:
        request.timeout_seconds = timeout
    allowed = id_outcome(hostile, request, job_id) if job_id != own else {OK}
    if allowed == {OK} and timeout is not None and not (math.isfinite(timeout) and 0 <= timeout <= 3600):
        allowed = {INVALID}
    elif allowed == {NOT_FOUND} and timeout is not None and not (math.isfinite(timeout) and 0 <= timeout <= 3600):
        allowed = {NOT_FOUND, INVALID}
    code, response = status_of(lambda: hostile.stub.Stop(request, timeout=60))
    assert code in allowed, (code, allowed, job_id[:80], force, timeout)
    if own:
        if code == OK:
            assert response.state == pb.STOPPED
        hostile.stub.Stop(pb.StopRequest(job_id=own, force=True), timeout=60)
    hostile.still_serves()


@settings(HOSTILE, max_examples=30)
@given(job_id=JOB_IDS)
@example(job_id="q" * (jobworker.MAX_REQUEST_BYTES - 5))      # a request of exactly 4 MiB: read, and refused as an id
@example(job_id="q" * (jobworker.MAX_REQUEST_BYTES - 4))      # one byte more: refused unread
def test_reliability_hostile_query_requests(hostile, job_id):
    job_id = hostile.job_id(job_id)
    request = pb.QueryRequest(job_id=job_id)
    code, response = status_of(lambda: hostile.stub.Query(request, timeout=60))
    assert code in id_outcome(hostile, request, job_id), (code, job_id[:80], request.ByteSize())
    if code == OK:
        assert response.job_id == job_id
    hostile.still_serves()


@settings(HOSTILE, max_examples=40)
@given(job_id=st.one_of(JOB_IDS, st.just("@ended")), offset=OFFSETS)
def test_reliability_hostile_stream_requests(hostile, job_id, offset):
    job_id = hostile.job_id(job_id)
    if job_id == hostile.running:
        job_id = hostile.ended  # a running job's stream waits for output past its end, as `tail -f` does
    request = pb.StreamRequest(job_id=job_id, offset=offset)
    allowed = id_outcome(hostile, request, job_id)
    size = sum(len(data) for _, data in hostile.ended_output)
    if allowed == {OK} and offset > size:
        allowed = {grpc.StatusCode.OUT_OF_RANGE}
    code, messages = status_of(lambda: list(hostile.stub.Stream(request, timeout=60)))
    assert code in allowed, (code, allowed, job_id[:80], offset)
    if code == OK:
        tagged = [(source, bytes([b])) for source, data in hostile.ended_output for b in data][offset:]
        got = [(m.source, bytes([b])) for m in messages for b in m.data]
        assert got == tagged and messages[-1].status.exit_code == 0
    hostile.still_serves()


def encode_varint(value):
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def parses(method, data):
    try:
        REQUEST_TYPES[method].FromString(data)
        return True
    except Exception:
        return False


INVALID_UTF8 = st.binary(min_size=1, max_size=20).filter(lambda b: not _is_utf8(b))


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


MALFORMED = st.one_of(
    st.binary(max_size=40),                                                        # random bytes
    INVALID_UTF8.map(lambda b: b"\x0a" + encode_varint(len(b)) + b),               # field 1 (command, job_id) not UTF-8
    st.sampled_from([b"\x08", b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\x0f", b"\xff\xff", b"\x0b", b"\x00",
                     b"\x12\x03\x09\x00\x00"]),  # truncated varint, length past the end, bad tag, field 0, bad group
)


@settings(HOSTILE, max_examples=30)
@given(method=st.sampled_from(METHODS), data=MALFORMED)
def test_reliability_malformed_requests_are_invalid_arguments(hostile, method, data):
    assume(not parses(method, data))
    code = raw_call(hostile.channel, method, data)
    assert code == INVALID, f"{method} with {data!r}: {code}"
    hostile.still_serves()


@settings(HOSTILE, max_examples=20)
@given(arguments=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20), max_size=6))
def test_reliability_unicode_arguments_reach_the_job_and_come_back_byte_exact(hostile, arguments):
    command = ["printf", "%s\\n", *arguments]
    response = hostile.stub.Start(pb.StartRequest(command=command), timeout=60)
    assert list(response.status.command) == command
    out, err, status = read_stream(hostile.stub, response.job_id)
    assert out == b"".join(a.encode() + b"\n" for a in arguments or [""]) and status.exit_code == 0, err
    assert list(hostile.stub.Query(pb.QueryRequest(job_id=response.job_id), timeout=60).command) == command


def test_reliability_oversized_requests_are_refused_before_they_cost_memory(hostile):
    huge = 64 * MiB
    requests = {
        "Start": pb.StartRequest(command=["true", "x" * (4 * huge)]),
        "Stop": pb.StopRequest(job_id="s" * huge),
        "Query": pb.QueryRequest(job_id="q" * huge),
        "Stream": pb.StreamRequest(job_id="t" * huge),
        "List": b"\x0a" + encode_varint(huge) + b"l" * huge,  # a field List does not know: read all the same
    }
    pid = hostile.server.proc.pid
    with PeakWatch(pid) as watch:
        for method, request in requests.items():
            data = request if isinstance(request, bytes) else request.SerializeToString()
            code = raw_call(hostile.channel, method, data)
            assert code == RESOURCE_EXHAUSTED, (method, code)
            hostile.still_serves()
    growth = watch.hwm - watch.start.rss
    assert growth <= OVERSIZE_MEMORY_SLACK, \
        f"five requests of {huge >> 20} to {huge >> 18} MiB raised the peak memory by {growth / MiB:.0f} MiB"


# -- identity ----------------------------------------------------------------------------------------------------------

def subject_types(cert):
    """The subject with each value's ASN.1 string type, as openssl prints it ("CN=UTF8STRING:ada,OU=...")."""
    return subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-subject", "-nameopt", "RFC2253,show_type"],
                          check=True, capture_output=True, text=True).stdout


def test_reliability_identity_matrix_every_kind_of_certificate_against_every_rpc(server, pki):
    DENIED, UNAUTHENTICATED, HANDSHAKE = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                                          grpc.StatusCode.UNAVAILABLE)
    everything = dict.fromkeys(METHODS, OK)
    observes = {"Start": DENIED, "Stop": DENIED, "Query": OK, "Stream": OK, "List": OK}
    every = lambda code: dict.fromkeys(METHODS, code)
    now = time.time()
    ca = pki._path("ca", "pem")
    other = PKI(os.path.join(pki.dir, "matrix-other"))

    def leaf(name, subject, mask="utf8only", **kwargs):
        """A client certificate whose subject strings openssl encodes as `mask` allows (utf8only, pkix: Printable
        where it can, MASK:0x800: BMPString, MASK:0x4: T61String)."""
        config = os.path.join(pki.dir, f"matrix-{name}.cnf")
        with open(config, "w") as f:
            f.write(f"[req]\ndistinguished_name = dn\nstring_mask = {mask}\n[dn]\n")
        return pki.leaf(f"matrix-{name}", subject, extra=("-config", config, "-utf8"), **kwargs)

    def tls(credentials, encoding=None):
        if encoding:
            assert f"OU={encoding}:" in subject_types(credentials[0]), subject_types(credentials[0])
        return lambda: (open_channel(server, credentials)[0], None)

    def no_certificate():
        with open(ca, "rb") as f:
            return grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(root_certificates=f.read())), None

    def tls_1_2():
        proxy = TLSProxy(server, "admin", ssl.TLSVersion.TLSv1_2)
        return grpc.insecure_channel(proxy.addr), proxy.close

    rows = [  # (who calls, how it connects, the outcome of each RPC, the identity its jobs get)
        ("admin", tls(pki.roles["admin"], "UTF8STRING"), everything, "ada"),
        ("user", tls(pki.roles["user"], "UTF8STRING"), everything, "alice"),
        ("observer", tls(pki.roles["observer"], "UTF8STRING"), observes, None),
        ("admin, PrintableString subject", tls(leaf("printable", "/O=jobworker/OU=admin/CN=pat", "pkix"),
                                                "PRINTABLESTRING"), everything, "pat"),
        ("user, BMPString subject, non-ASCII CN", tls(leaf("bmp", "/O=jobworker/OU=user/CN=Zoë", "MASK:0x800"),
                                                       "BMPSTRING"), everything, "Zoë"),
        ("observer, UTF8String CN beyond the BMP", tls(leaf("astral", "/O=jobworker/OU=observer/CN=Zoë 😀"),
                                                        "UTF8STRING"), observes, None),
        ("user, OU and CN in one multi-valued RDN", tls(leaf("multi", "/O=jobworker/OU=user+CN=mv")), everything, "mv"),
        ("T61String subject (not decodable: refused)", tls(leaf("t61", "/O=jobworker/OU=admin/CN=tex", "MASK:0x4"),
                                                            "T61STRING"), every(UNAUTHENTICATED), None),
        ("no role", tls(leaf("norole", "/O=jobworker/CN=nora")), every(DENIED), None),
        ("two roles", tls(leaf("two", "/O=jobworker/OU=user/OU=observer/CN=duo")), every(DENIED), None),
        ("unknown role", tls(leaf("unknown", "/O=jobworker/OU=superuser/CN=sue")), every(DENIED), None),
        ("a role in capitals", tls(leaf("caps", "/O=jobworker/OU=ADMIN/CN=cap")), every(DENIED), None),
        ("no CN", tls(leaf("nocn", "/O=jobworker/OU=admin")), every(UNAUTHENTICATED), None),
        ("signed by another CA", tls(other.leaf("matrix-stranger", "/O=jobworker/OU=admin/CN=mallory")),
         every(HANDSHAKE), None),
        ("expired", tls(pki.leaf("matrix-expired", "/O=jobworker/OU=admin/CN=old", start=now - 86400 * 10,
                                 end=now - 86400)), every(HANDSHAKE), None),
        ("not yet valid", tls(pki.leaf("matrix-future", "/O=jobworker/OU=admin/CN=new", start=now + 86400,
                                       end=now + 86400 * 10)), every(HANDSHAKE), None),
        ("the server's certificate", tls(pki.server), every(HANDSHAKE), None),
        ("serverAuth-only certificate with an admin OU", tls(leaf("serverauth", "/O=jobworker/OU=admin/CN=srv",
                                                                  usage="serverAuth")), every(HANDSHAKE), None),
        ("no client certificate", no_certificate, every(HANDSHAKE), None),
        ("plaintext", lambda: (grpc.insecure_channel(server.addr), None), every(HANDSHAKE), None),
        ("admin over TLS 1.2", tls_1_2, every(UNAUTHENTICATED), None),
    ]
    admin = server.client("admin")
    target = admin.start(["sh", "-c", "echo running; exec sleep 600"])  # another's job, for those that may not start
    mismatches = []
    for who, connect, expected, identity in rows:
        channel, cleanup = connect()
        stub = jobworker.pb_grpc.JobWorkerStub(channel)

        def first_message(job_id):
            call = stub.Stream(pb.StreamRequest(job_id=job_id), timeout=10)
            try:
                return next(call)
            finally:
                call.cancel()

        try:
            got = {}
            got["Start"], started = status_of(lambda: stub.Start(pb.StartRequest(command=["true"]), timeout=10))
            job_id = started.job_id if started else target
            got["Query"], queried = status_of(lambda: stub.Query(pb.QueryRequest(job_id=job_id), timeout=10))
            got["Stream"], _ = status_of(lambda: first_message(job_id))
            got["List"], _ = status_of(lambda: stub.List(pb.ListRequest(), timeout=10))
            got["Stop"], _ = status_of(lambda: stub.Stop(pb.StopRequest(job_id=job_id, force=True), timeout=10))
        finally:
            channel.close()
            if cleanup:
                cleanup()
        for method in METHODS:
            if got[method] != expected[method]:
                mismatches.append(f"{who}: {method} {got[method].name}, expected {expected[method].name}")
        owners = {response.owner for response in (started and started.status, queried) if response}
        if started and owners != {identity}:
            mismatches.append(f"{who}: its job's owner is {owners}, expected {identity!r}")
    assert admin.query(target).state == pb.RUNNING, "a caller without the right stopped another's job"
    admin.stop(target, force=True)
    assert not mismatches, "\n".join(mismatches)
