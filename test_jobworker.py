"""Tests for jobworker, through the real server over mutual TLS on loopback, with real processes and certificates.

Every server here is `python jobworker.py serve` in its own process; certificates are made with openssl. Isolation
tests need root (as CI runs) and are skipped without it.
"""

import contextlib
import filecmp
import hashlib
import json
import os
import random
import re
import select
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

    def __init__(self, pki, directory, *options):
        self.pki = pki
        os.makedirs(directory, exist_ok=True)
        self.data_dir = os.path.join(directory, "data")
        self.log_path = os.path.join(directory, "server.log")
        self.log = open(self.log_path, "wb")
        cert, key = pki.server
        self.proc = subprocess.Popen(
            [sys.executable, JOBWORKER, "serve", "--addr", "127.0.0.1:0", "--cert", cert, "--key", key,
             "--ca", pki._path("ca", "pem"), "--data-dir", self.data_dir, *options],
            stdout=subprocess.PIPE, stderr=self.log, env=dict(os.environ, JOBWORKER_SECRET="hunter2"))
        line = self.proc.stdout.readline().decode()
        match = re.match(r"listening on port (\d+)", line)
        if not match:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"server did not start: {line!r} {self.read_log()}")
        self.addr = f"127.0.0.1:{match.group(1)}"
        self._clients = []

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
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "py-spy"), "dump", "--pid", str(self.proc.pid)])
            raise
        self.proc.stdout.close()
        self.log.close()
        return code


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


class TLSProxy:
    """Plain TCP in on loopback, TLS out to the server with the client certificate, at a chosen TLS version.

    gRPC Python cannot choose its TLS version; Python's ssl can. A gRPC client speaks plaintext HTTP/2 to this proxy,
    which carries it to the server over a TLS connection it made itself.
    """

    def __init__(self, server, role, version):
        self.target = server.addr.rsplit(":", 1)
        cert, key = server.pki.roles[role]
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server.pki._path("ca", "pem"))
        self.context.load_cert_chain(cert, key)
        self.context.minimum_version = self.context.maximum_version = version
        self.context.set_alpn_protocols(["h2"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.versions = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                plain, _ = self.listener.accept()
            except OSError:
                return
            raw = socket.create_connection((self.target[0], int(self.target[1])))
            tls = self.context.wrap_socket(raw, server_hostname="localhost")
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


class CuttableProxy:
    """A TCP proxy on loopback whose connections the test can cut, to drop a client's stream mid-way."""

    def __init__(self, target):
        self.target = target.rsplit(":", 1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections, self.accepted = [], threading.Semaphore(0)
        self.relayed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            self.connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()
            self.accepted.release()

    def _pipe(self, source, sink, count=False):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if count:
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
