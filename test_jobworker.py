"""Tests for jobworker, through the real server over mutual TLS on loopback, with real processes and certificates.

Every server here is `python jobworker.py serve` in its own process; certificates are made with openssl. Isolation
tests need root (as CI runs) and are skipped without it.
"""

import argparse
import collections
import contextlib
import errno
import filecmp
import functools
import hashlib
import json
import math
import os
import pathlib
import pwd
import random
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

import jobworker
from gen import jobworker_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
JOBWORKER = os.path.join(HERE, "jobworker.py")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="isolation needs root")
# Every job has a /tmp of its own: what a test shares with its jobs (a gate, a working directory) is where they see the
# host's files.
SHARED = "/run" if ROOT and os.path.isdir("/run") else tempfile.gettempdir()
Code = grpc.StatusCode
OK = Code.OK
MiB = 1 << 20
# Seconds after which a wait that a slow machine may need is taken for a hang: a guard, never a bound on speed (the
# benchmark measures that). An emulated CPU needs minutes where real hardware needs seconds.
HANG_GUARD = 1200


# ---------------------------------------------------------------------------------------------------------------------
# Certificates, servers and clients
# ---------------------------------------------------------------------------------------------------------------------

class PKI:
    """Certificates made with openssl: CAs, and any leaf they sign, with any subject, usage and dates."""

    CONFIG = ("[ca]\ndefault_ca = jw\n[jw]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\ndefault_md = sha256\n"
              "policy = anything\nunique_subject = no\nrand_serial = yes\nemail_in_dn = no\n[anything]\n")

    def __init__(self, directory):
        self.dir = directory
        self.ca_cert = self.ca("ca")
        self.roles = {}

    def _path(self, name, ext):
        return os.path.join(self.dir, f"{name}.{ext}")

    def _key(self, name):
        key = self._path(name, "key")
        run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        return key

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

    def leaf(self, name, subject, ca="ca", usage="clientAuth", start=None, end=None, mask="utf8only", is_ca=False):
        """A certificate for `subject` (openssl -subj form) signed by `ca`, valid from `start` to `end` (an hour ago to
        30 days on), its strings encoded as `mask` allows (utf8only; pkix: PrintableString where it can; MASK:0x800:
        BMPString; MASK:0x4: T61String), a CA's if `is_ca` (CA:TRUE, and it may sign certificates); returns
        (cert, key)."""
        key, csr, config, ext = self._key(name), *(self._path(name, ext) for ext in ("csr", "cnf", "ext"))
        with open(config, "w") as f:
            f.write(f"[req]\ndistinguished_name = dn\nstring_mask = {mask}\n[dn]\n")
        run("openssl", "req", "-new", "-key", key, "-subj", subject, "-config", config, "-utf8", "-out", csr)
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature,keyCertSign\n" if is_ca
                    else "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
            f.write(f"extendedKeyUsage={usage}\n")
            if usage == "serverAuth":
                f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        now = time.time()
        stamp = lambda t: time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t))
        run("openssl", "ca", "-batch", "-config", os.path.join(self.dir, ca + ".d", "ca.cnf"),
            "-cert", self._path(ca, "pem"), "-keyfile", self._path(ca, "key"), "-in", csr,
            "-out", self._path(name, "pem"), "-startdate", stamp(now - 3600 if start is None else start),
            "-enddate", stamp(now + 30 * 86400 if end is None else end), "-extfile", ext,
            "-notext", "-preserveDN", "-multivalue-rdn")
        return self._path(name, "pem"), key

    def credentials(self, who):
        """(cert, key) of a role's client certificate, or `who` itself when it is such a pair already."""
        return self.roles[who] if isinstance(who, str) else who


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


# Each role's subject, as the server names the owner of a job (the certificate's whole subject).
SUBJECT = {"admin": "O=jobworker,OU=admin,CN=ada", "user": "O=jobworker,OU=user,CN=alice",
           "user2": "O=jobworker,OU=user,CN=bob", "observer": "O=jobworker,OU=observer,CN=olivia"}


def tls_context(pki, who="admin", version=None):
    """A client's TLS context (Python's ssl, which can choose the TLS version gRPC Python cannot), speaking h2."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca_cert)
    context.load_cert_chain(*pki.credentials(who))
    if version:
        context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    return context


class Server:
    """`python jobworker.py serve` on a free loopback port, in its own process; its data in DIRECTORY/data unless
    `data_dir` says (that of an earlier server, say)."""

    def __init__(self, pki, directory, *options, prefix=(), data_dir=None):
        self.pki = pki
        os.makedirs(directory, exist_ok=True)
        self.data_dir = data_dir or os.path.join(directory, "data")
        self.log_path = os.path.join(directory, "server.log")
        self.log = open(self.log_path, "wb")
        cert, key = pki.server
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, JOBWORKER, "serve", "--addr", "127.0.0.1:0", "--cert", cert, "--key", key,
             "--ca", pki.ca_cert, "--data-dir", self.data_dir, *options],
            stdout=subprocess.PIPE, stderr=self.log, env=dict(os.environ, JOBWORKER_SECRET="hunter2"))
        line = self.proc.stdout.readline().decode()
        match = re.match(r"listening on port (\d+)", line)
        if not match:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._end()
            raise RuntimeError(f"server did not start: {line!r} {self.read_log()}")
        self.port = int(match.group(1))
        self.addr = f"127.0.0.1:{self.port}"
        self._clients = []
        SERVERS.append(self)

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def client(self, role="admin"):
        """A jobworker.Client of this server, closed when the server stops."""
        client = jobworker.Client(self.addr, *self.pki.credentials(role), self.pki.ca_cert)
        self._clients.append(client)
        return client

    def cli_argv(self, action, *rest, role="admin", addr=None):
        """The command line of `python jobworker.py ACTION` with the connection flags for this server (or `addr`)."""
        cert, key = self.pki.credentials(role)
        return [sys.executable, JOBWORKER, action, "--addr", addr or self.addr, "--cert", cert, "--key", key,
                "--ca", self.pki.ca_cert, *rest]

    def cli(self, *argv, role="admin", addr=None, timeout=60):
        return subprocess.run(self.cli_argv(*argv, role=role, addr=addr), capture_output=True, timeout=timeout)

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
def every_server_stops_cleanly():
    """Stops the servers a test started and left running: each must exit 0 on SIGTERM and leave no cgroup behind."""
    before = len(SERVERS)
    yield
    problems = stop_servers_started_since(before)
    assert not problems, "\n".join(problems)


def stop_servers_started_since(before):
    """Stops the servers started since SERVERS held `before` of them; returns what went wrong."""
    started, SERVERS[before:] = SERVERS[before:], []
    problems = []
    for server in started:
        if server.proc.poll() is None:
            code = server.stop()
            problems += [f"exit status {code}: {server.read_log()[-2000:]}"] * (code != 0)
            problems += ["a cgroup outlived the server"] * bool(cgroups_of(server.proc.pid))
    return problems


@pytest.fixture(scope="session")
def server(pki, tmp_path_factory):
    server = Server(pki, str(tmp_path_factory.mktemp("server")))
    yield server
    assert server.stop() == 0, server.read_log()
    assert not cgroups_of(server.proc.pid), "a cgroup outlived the server"


@pytest.fixture
def admin(server):
    return server.client("admin")


@pytest.fixture
def disk_directory():
    """A new directory anyone may write in, on a block device (beside the checkout, the cgroup v2 VM's disk, or the
    root's), for what a tmpfs cannot show; the test is skipped where there is none. Never under /tmp, /var/tmp or
    /dev/shm, which every job has of its own. The servers the test started there stop before it is removed."""
    parent = next((parent for parent in (HERE, "/mnt/data", "/var/lib")
                   if os.path.isdir(parent) and jobworker.block_device_of(parent)
                   and not any(is_within(parent, private) for private in jobworker.PRIVATE_TMP)), None)
    if parent is None:
        pytest.skip("no directory on a block device")
    directory = tempfile.mkdtemp(prefix="jobworker-disk-", dir=parent)
    os.chmod(directory, 0o777)  # for nobody
    before = len(SERVERS)
    yield directory
    problems = stop_servers_started_since(before)
    shutil.rmtree(directory)
    assert not problems, "\n".join(problems)


def is_within(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def open_channel(server, credentials="admin", addr=None):
    """A channel of its own (its own connection, never shared with another channel) and its stub; `credentials` is a
    role, a (cert, key) pair, or None for a client without a certificate."""
    cert, key = server.pki.credentials(credentials) if credentials else (None, None)
    read = lambda path: path and pathlib.Path(path).read_bytes()
    channel = grpc.secure_channel(
        addr or server.addr, grpc.ssl_channel_credentials(read(server.pki.ca_cert), read(key), read(cert)),
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)])
    return channel, jobworker.pb_grpc.JobWorkerStub(channel)


# ---------------------------------------------------------------------------------------------------------------------
# Calls, streams, jobs and processes
# ---------------------------------------------------------------------------------------------------------------------

Outcome = collections.namedtuple("Outcome", "code response")


def status_of(call):
    """The Outcome of a call: its status code, and its response if it succeeded. A refusal must say why."""
    try:
        return Outcome(OK, call())
    except grpc.RpcError as e:
        assert e.details(), f"{e.code()} without a message"
        return Outcome(e.code(), None)


Streamed = collections.namedtuple("Streamed", "out err size sha256 status")


def read_stream(stub, job_id, offset=0, keep=True, first=None, timeout=HANG_GUARD):
    """A whole stream of a job's output on a raw stub (no reconnecting), checked as it comes: every message begins
    where the previous one ended, and the final status comes last. Returns a Streamed: stdout and stderr apart (None
    unless `keep`: a large output need only be counted and digested), the number of bytes and the sha256 of them all
    in arrival order, and the final status. `first` is called after the first message."""
    out, err, digest, size, status = bytearray(), bytearray(), hashlib.sha256(), 0, None
    for message in stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset), timeout=timeout):
        assert status is None, "a message after the final status"
        assert message.offset == offset + size, f"a gap or a repeat at {offset + size}: a message at {message.offset}"
        size += len(message.data)
        digest.update(message.data)
        if keep:
            (err if message.source == pb.StreamResponse.STDERR else out).extend(message.data)
        if message.HasField("status"):
            status = message.status
        if first:
            first, call = None, first
            call()
    assert status is not None, "the stream ended without the job's final status"
    return Streamed(bytes(out) if keep else None, bytes(err) if keep else None, size, digest.hexdigest(), status)


def run_job(client, command, **limits):
    """Starts a job through a jobworker.Client and streams it to its end: the Streamed."""
    return read_stream(client.stub, client.start(command, **limits))


def wait_for_output(stub, job_id, expected, offset=0):
    """Reads a job's output from `offset` until `expected` has come (the job has got that far), checks that it is what
    came, and leaves the stream."""
    call, got = stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset), timeout=120), bytearray()
    try:
        for message in call:
            got += message.data
            if len(got) >= len(expected):
                break
    finally:
        call.cancel()
    assert got[:len(expected)] == expected, f"{bytes(got[:100])!r}, expected {expected[:100]!r}"


def start_with_a_daemon(client):
    """Starts a job that leaves a daemon behind (a double fork, in a session of its own) and goes on running; returns
    (its id, the marker of its processes) once both run."""
    label = marker()
    job_id = client.start(["sh", "-c", f"setsid sh -c 'sleep {label} & echo daemon'; echo ready; sleep {label}"])
    wait_for_output(client.stub, job_id, b"daemon\nready\n")
    # Each sleep may still be a shell's fork, or be in execve (its command line empty for that moment).
    assert wait_until(lambda: len(processes_with(f"sleep\0{label}")) == 2), "the daemon's sleep and the job's"
    return job_id, label


class Concurrently:
    """Runs each call in a thread of its own, all at once. A call that fails breaks `barriers` (so that nobody waits
    for it there); `meet` waits at a barrier with the calls and `results` for their ends, each raising the failure."""

    def __init__(self, calls, barriers=()):
        self._outcomes, self._barriers = [None] * len(calls), barriers
        self._threads = [threading.Thread(target=self._run, args=item, daemon=True) for item in enumerate(calls)]
        for thread in self._threads:
            thread.start()

    def _run(self, i, call):
        try:
            self._outcomes[i] = (call(), None)
        except BaseException as e:  # raised again in the test's thread
            self._outcomes[i] = (None, e)
            for barrier in self._barriers:
                barrier.abort()

    def meet(self, barrier, timeout=HANG_GUARD):
        try:
            barrier.wait(timeout)
        except threading.BrokenBarrierError:
            self.raise_failure()  # the failure that broke it, without waiting for the calls still under way
            raise

    def results(self, timeout=2 * HANG_GUARD):  # a call may wait for its Start, then for its stream
        """What each call returned, in order."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self._threads), "a call never returned"
        self.raise_failure()
        return [result for result, _ in self._outcomes]

    def raise_failure(self):
        """Raises the failure of a call that has failed so far, if any: the one that broke a barrier, if it can."""
        failures = [outcome[1] for outcome in self._outcomes if outcome and outcome[1] is not None]
        if failures:
            raise next((e for e in failures if not isinstance(e, threading.BrokenBarrierError)), failures[0])


def marker():
    """A number to put in a job's command line, to find its processes with processes_with()."""
    return str(random.randint(10 ** 8, 10 ** 9))


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


def proc_status(pid):
    """The fields of /proc/PID/status ("State", "PPid", "VmRSS", ...), as text."""
    with open(f"/proc/{pid}/status") as f:
        return {key: value.strip() for key, value in (line.split(":", 1) for line in f)}


def children_of(pid):
    """The pids of a process's children, from every one of its threads (none if it is gone)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.exists(f"/proc/{pid}/task") else ():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(child) for child in f.read().split()]
    return children


def wait_until(condition, timeout=90, interval=0.05):
    """Polls `condition` until it holds or `timeout` seconds have passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def py(code):
    """A job running Python code, with the host's system interpreter (which the job's PATH finds)."""
    return ["python3", "-c", code]


def pattern(blocks, size=MiB):
    """The bytes PATTERN_JOB writes: `blocks` blocks of pseudo-random bytes, each numbered."""
    rng = random.Random(7)
    return b"".join(i.to_bytes(8, "big") + rng.randbytes(size - 8) for i in range(blocks))


PATTERN_JOB = ("import random, sys\nrng = random.Random(7)\nout = sys.stdout.buffer\n"
               "for i in range({blocks}):\n    out.write(i.to_bytes(8, 'big') + rng.randbytes({size} - 8))\n")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def wall_seconds(status):
    return (status.ended_at.ToNanoseconds() - status.started_at.ToNanoseconds()) / 1e9


def output_path(server, job_id):
    """Where a server keeps a job's output (every byte, in arrival order)."""
    return os.path.join(server.data_dir, "jobs", job_id, "output")


PID_NAMESPACE = os.stat("/proc/self/ns/pid").st_ino  # the test servers' too


def cgroup_name(server_pid):
    """The name of a server's own cgroup directory, under its cgroup: jobworker-PID-NS (NS: its PID namespace)."""
    return f"jobworker-{server_pid}-{PID_NAMESPACE}"


def cgroups_of(server_pid):
    """The cgroup directories a server made (its jobworker-PID-NS directories and its jobs' groups), still present."""
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(root) == cgroup_name(server_pid):
            found += [root] + [os.path.join(root, d) for d in dirs]
            dirs[:] = []
    return found


class Gate:
    """Holds a job at a point until the test lets it on, without sleeps: the job connects to this Unix socket, says
    it is ready, and blocks reading from it until the test opens the gate (closes the connection)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="jobworker-gate-", dir=SHARED)
        os.chmod(self.dir, 0o755)  # jobs run as users of their own
        self.path = os.path.join(self.dir, "gate")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o777)
        self.listener.listen()
        self.listener.settimeout(HANG_GUARD)

    def hold(self, before="print('ready', flush=True)\n"):
        """Python code that holds the job at this point."""
        return (f"import socket\ngate = socket.socket(socket.AF_UNIX)\ngate.connect({self.path!r})\n{before}"
                f"gate.recv(1)\n")

    def open(self):
        connection, _ = self.listener.accept()
        connection.close()

    def hold_all(self, count, calls):
        """Waits until `count` jobs are held here; returns their connections. If none came for too long, the failure
        of one of `calls` (a Concurrently) that would have started one is raised, rather than the wait's timeout."""
        try:
            return [self.listener.accept()[0] for _ in range(count)]
        except TimeoutError:
            calls.raise_failure()
            raise

    def close(self):
        self.listener.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.close()


@pytest.fixture
def job_directory():
    """A directory every job may enter (a test's tmp_path is under a directory only root may enter)."""
    directory = tempfile.mkdtemp(prefix="jobworker-directory-", dir=SHARED)
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory)


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
    ran = read_stream(admin.stub, job_id)
    assert (ran.out, ran.err) == (b"out\n", b"err\n")
    assert ran.status.state == pb.EXITED and ran.status.exit_code == 3 and ran.status.signal == 0
    queried = admin.query(job_id)
    assert queried.job_id == job_id and queried.owner == SUBJECT["admin"]
    assert list(queried.command) == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert queried.output_bytes == 8 and queried.pid > 0
    assert queried.ended_at.ToNanoseconds() >= queried.started_at.ToNanoseconds() > 0
    later = admin.start(["true"])
    listed = [s.job_id for s in admin.list()]
    assert listed.index(later) < listed.index(job_id), "List is newest first"


def test_job_killed_by_signal_reports_it(admin):
    status = run_job(admin, ["sh", "-c", "kill -TERM $$"]).status
    assert status.state == pb.EXITED and not status.HasField("exit_code") and status.signal == signal.SIGTERM


def test_binary_output_is_byte_exact_and_streams_stay_apart(admin):
    data = bytes(range(256)) * 64
    code = ("import sys\ndata = bytes(range(256)) * 64\n"
            "sys.stdout.buffer.write(data); sys.stdout.flush()\nsys.stderr.buffer.write(data[::-1])")
    ran = run_job(admin, py(code))
    assert ran.out == data and ran.err == data[::-1] and ran.status.exit_code == 0


def test_output_larger_than_100_mb_is_byte_exact(admin):
    blocks = 120
    ran = run_job(admin, py(PATTERN_JOB.format(blocks=blocks, size=MiB)))
    assert ran.status.exit_code == 0, ran.err
    assert ran.size == blocks << 20 and ran.sha256 == sha256(pattern(blocks))


@pytest.mark.skipif(not shutil.which("fincore"), reason="util-linux's fincore is needed to see the page cache")
def test_output_leaves_the_page_cache_behind_it_streamed_live_or_again(pki, disk_directory):
    """What the disk has taken and every stream has read is dropped from memory, so a job's output does not fill the
    page cache: neither streamed live, nor read again once the job has ended. The data directory is on a disk (on a
    tmpfs the output is memory, with nowhere to be dropped to)."""
    server = Server(pki, os.path.join(disk_directory, "server"))
    admin = server.client()
    size, bound = 96 << 20, 3 * jobworker.OutputLog.WINDOW  # the last steps of the writer and the reader
    job_id = admin.start(["head", "-c", str(size), "/dev/zero"])
    for _ in ("live", "again"):
        ran = read_stream(admin.stub, job_id, keep=False)
        assert ran.size == size and ran.status.exit_code == 0
        resident = subprocess.check_output(["fincore", "--bytes", "--noheadings", "--output", "RES",
                                            output_path(server, job_id)])
        assert int(resident) <= bound
    assert server.stop() == 0, server.read_log()


def test_job_environment_is_clean_and_stdin_empty(admin):
    ran = run_job(admin, ["sh", "-c", "env; cat; echo end"])
    env = dict(line.split("=", 1) for line in ran.out.decode().splitlines() if "=" in line)
    assert "JOBWORKER_SECRET" not in env, "the server's environment leaked into the job"
    assert env["PATH"] and env["LANG"] and "HOME" in env
    assert ran.out.endswith(b"end\n") and ran.status.exit_code == 0


JOB_SEES = py("import json, os\nprint(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ)}))")  # as JSON


def test_a_job_gets_the_variables_and_working_directory_it_is_given(server, admin, job_directory):
    secret = f"secret-{marker()}"
    env = {"GREETING": "hello world", "EMPTY": "", "ODD": "Zoë 😀\nb=c", "HOME": "/nowhere", "TOKEN": secret}
    size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items())
    env["BIG"] = "x" * (jobworker.MAX_VARIABLES_BYTES - size - len("BIG=\0"))  # with the others: all it may take
    job_id = admin.start(JOB_SEES, env=env, working_directory=job_directory)
    ran = read_stream(admin.stub, job_id)
    seen = json.loads(ran.out)
    assert seen["cwd"] == job_directory
    base = {"PATH": jobworker.JOB_PATH, "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
    base.update({"HOME": "/tmp"} if ROOT else {"USER": pwd.getpwuid(os.geteuid()).pw_name})
    assert seen["env"] == {**seen["env"], **base, **env}, "a variable given, or of the base, is missing or different"
    assert "JOBWORKER_SECRET" not in seen["env"]
    assert dict(ran.status.env) == env and ran.status.working_directory == job_directory
    plain = run_job(admin, JOB_SEES)
    home = "/tmp" if ROOT else "/"  # a transient user's home, its private /tmp
    assert json.loads(plain.out)["cwd"] == home and plain.status.working_directory == home and not plain.status.env
    with open(os.path.join(server.data_dir, "audit.log")) as f:
        audit = f.read()
    entry = next(e for e in map(json.loads, audit.splitlines()) if e["action"] == "start" and e["job_id"] == job_id)
    assert entry["env"] == sorted(env) and entry["working_directory"] == job_directory
    assert secret not in audit and secret not in server.read_log(), "a variable's value reached the audit"


def test_a_path_of_the_clients_is_where_the_command_is_looked_for(admin, job_directory):
    program = os.path.join(job_directory, "only-here")
    with open(program, "w") as f:
        f.write('#!/bin/sh\necho "found, with PATH=$PATH"\n')
    os.chmod(program, 0o755)
    assert status_of(lambda: admin.start(["only-here"])).code == Code.INVALID_ARGUMENT
    ran = run_job(admin, ["only-here"], env={"PATH": job_directory})
    assert ran.out == f"found, with PATH={job_directory}\n".encode() and ran.status.exit_code == 0


def test_variables_and_working_directories_a_job_cannot_have_are_refused_naming_them(admin, job_directory):
    closed, a_file = os.path.join(job_directory, "closed"), os.path.join(job_directory, "a-file")
    os.mkdir(closed, 0)  # the job's user cannot enter it (nobody, or a server's own user without root's rights)
    open(a_file, "w").close()
    over = jobworker.MAX_VARIABLES_BYTES
    variables = {  # the variables -> what the refusal must name
        "empty name": ({"": "x"}, "''"), "a name with =": ({"A=B": "x"}, "'A=B'"),
        "a name with NUL": ({"A\0B": "x"}, "'A\\x00B'"), "a value with NUL": ({"NUL": "a\0b"}, "NUL"),
        "one too large": ({"BIG": "x" * over}, str(over)),
        "too many": ({f"V{i}": "x" * 100 for i in range(over // 100)}, str(over)),
    }
    directories = {  # the working directory -> what the refusal must say
        "relative": ("tmp", "absolute"), "dot": ("./", "absolute"), "NUL": ("/tmp\0x", "absolute"),
        "missing": ("/no/such/directory", "No such file"), "a file": (a_file, "Not a directory"),
        "closed to the job's user": (closed, "Permission denied"),
    }
    before = len(admin.list())
    cases = [(name, lambda e=env: admin.start(["true"], env=e), named) for name, (env, named) in variables.items()]
    cases += [(name, lambda d=path: admin.start(["true"], working_directory=d), [path[:4], said])
              for name, (path, said) in directories.items()]
    for name, start, named in cases:
        with pytest.raises(grpc.RpcError) as caught:
            start()
        assert caught.value.code() == Code.INVALID_ARGUMENT, name
        for expected in [named] if isinstance(named, str) else named:
            assert expected in caught.value.details(), (name, caught.value.details())
    assert len(admin.list()) == before, "a refused Start left a job"


def test_wait_returns_the_final_status_once_the_job_has_ended(admin, gate):
    job_id = admin.start(py(gate.hold() + "raise SystemExit(6)"))
    wait_for_output(admin.stub, job_id, b"ready\n")
    waiting = admin.stub.Wait.future(pb.WaitRequest(job_id=job_id), timeout=120)
    # While the job runs, a Wait does not return: its deadline passes (and the first Wait has reached the server).
    assert status_of(lambda: admin.stub.Wait(pb.WaitRequest(job_id=job_id), timeout=1)).code == Code.DEADLINE_EXCEEDED
    assert not waiting.done()
    gate.open()
    ended = waiting.result()
    assert ended.state == pb.EXITED and ended.exit_code == 6 and ended.job_id == job_id
    assert ended == admin.query(job_id) == admin.wait(job_id), "an ended job's Wait returns its final status at once"
    assert status_of(lambda: admin.wait(str(uuid.uuid4()))).code == Code.NOT_FOUND


def test_concurrent_streamers_of_a_live_job_get_identical_complete_output(admin, gate):
    job_id = admin.start(py(gate.hold() + PATTERN_JOB.format(blocks=24, size=65536)))
    attached = threading.Barrier(9)  # every reader has the first bytes while the job is still held
    read = functools.partial(read_stream, admin.stub, job_id, first=functools.partial(attached.wait, 30))
    readers = Concurrently([read] * 8, (attached,))
    readers.meet(attached, 30)
    gate.open()
    expected = b"ready\n" + pattern(24, 65536)
    for ran in readers.results():
        assert ran.out == expected and ran.status.exit_code == 0


def test_stream_resumes_from_any_offset_and_keeps_the_order_bytes_came_in(admin):
    job_id = admin.start(["sh", "-c", "printf abc; printf DEF >&2; printf ghi"])
    whole = read_stream(admin.stub, job_id)
    messages = [m for m in admin.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60) if m.data]
    tagged = [(m.source, byte) for m in messages for byte in m.data]  # every byte, in arrival order
    assert b"".join(m.data for m in messages) in (b"abcDEFghi", b"abcghiDEF", b"DEFabcghi")
    assert (whole.out, whole.err) == (b"abcghi", b"DEF")
    for offset in range(len(tagged) + 1):
        ran = read_stream(admin.stub, job_id, offset)
        assert ran.out == bytes(b for source, b in tagged[offset:] if source == pb.StreamResponse.STDOUT)
        assert ran.err == bytes(b for source, b in tagged[offset:] if source == pb.StreamResponse.STDERR)
        assert ran.status.exit_code == 0
    assert status_of(lambda: read_stream(admin.stub, job_id, len(tagged) + 1)).code == Code.OUT_OF_RANGE


def test_graceful_stop_delivers_sigterm_to_the_command(admin):
    job_id = admin.start(["sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 600 & wait"])
    wait_for_output(admin.stub, job_id, b"ready\n")  # it is running and has set its trap
    status = admin.stop(job_id, timeout=30)
    assert status.state == pb.STOPPED and status.exit_code == 7
    assert read_stream(admin.stub, job_id).out == b"ready\ngot TERM\n"


def test_force_stop_kills_at_once(admin):
    job_id = admin.start(["sleep", "600"])
    status = admin.stop(job_id, force=True)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL


def test_stopping_an_ended_job_returns_its_final_status_unchanged(admin):
    status = run_job(admin, ["sh", "-c", "exit 4"]).status
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
        assert caught.value.code() == Code.INVALID_ARGUMENT, name
        assert caught.value.details(), name
    assert len(admin.list()) == before
    assert "No such file" in str(pytest.raises(grpc.RpcError, admin.start, ["/no/such/program"]).value.details())


def test_bad_job_ids_and_unknown_jobs(admin):
    for bad in ("", "not-a-uuid", "7D185458-2063-4754-B333-E0A322C26FD9", "x" * 10000, "é"):
        assert status_of(lambda: admin.query(bad)).code == Code.INVALID_ARGUMENT
    unknown = str(uuid.uuid4())
    for call in (admin.query, admin.stop, lambda j: read_stream(admin.stub, j)):
        assert status_of(lambda: call(unknown)).code == Code.NOT_FOUND


def test_bad_stop_timeouts_and_limits(admin):
    job_id = admin.start(["sleep", "600"])
    for timeout in (-1, float("nan"), float("inf"), 10 ** 9):
        assert status_of(lambda: admin.stop(job_id, timeout=timeout)).code == Code.INVALID_ARGUMENT
    admin.stop(job_id, force=True)
    for limits in ({"cpu_cores": -1}, {"cpu_cores": float("nan")}, {"cpu_cores": 10 ** 6}, {"memory_bytes": 2 ** 63}):
        assert status_of(lambda: admin.start(["true"], **limits)).code == Code.INVALID_ARGUMENT, limits


def test_audit_log_records_every_start_and_stop(server, admin):
    job_id = admin.start(["sleep", "600"])
    admin.stop(job_id, force=True)
    observer = server.client("observer")
    assert status_of(lambda: observer.start(["true"])).code == Code.PERMISSION_DENIED
    with open(os.path.join(server.data_dir, "audit.log")) as f:
        entries = [json.loads(line) for line in f]
    start = next(e for e in entries if e["action"] == "start" and e["job_id"] == job_id)
    stop = next(e for e in entries if e["action"] == "stop" and e["job_id"] == job_id)
    assert start["who"] == SUBJECT["admin"] and start["role"] == "admin" and start["result"] == "OK"
    assert start["command"] == ["sleep", "600"] and start["time"]
    assert stop["result"] == "OK" and stop["force"] is True
    denied = [e for e in entries if e["who"] == SUBJECT["observer"] and e["action"] == "start"]
    assert denied and denied[-1]["result"] == "PERMISSION_DENIED"


def fingerprint(cert):
    """The SHA-256 fingerprint of a certificate file (of its DER), as the audit log names a caller's."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pathlib.Path(cert).read_text())).hexdigest()


def test_every_refused_call_is_audited_with_the_callers_subject_and_fingerprint(server, pki):
    """Query, Stream, Wait and List refused (a job not found, a bad page size; a certificate without a role, refused
    before it is identified): each is an audit entry naming the caller's subject and its certificate's fingerprint."""
    callers = {"user": pki.leaf("refused-user", "/O=jobworker/OU=user/CN=refused"),
               "roleless": pki.leaf("refused-roleless", "/O=jobworker/CN=roleless")}
    subjects = {"user": "O=jobworker,OU=user,CN=refused", "roleless": "O=jobworker,CN=roleless"}
    missing = str(uuid.uuid4())
    refusals = {}  # (caller, action) -> (code, message)
    for name, credentials in callers.items():
        channel, stub = open_channel(server, credentials)
        with channel:
            calls = {"query": lambda: stub.Query(pb.QueryRequest(job_id=missing), timeout=10),
                     "stream": lambda: next(stub.Stream(pb.StreamRequest(job_id=missing), timeout=10)),
                     "wait": lambda: stub.Wait(pb.WaitRequest(job_id=missing), timeout=10),
                     "list": lambda: stub.List(pb.ListRequest(page_size=1001), timeout=10)}
            for action, call in calls.items():
                refused = pytest.raises(grpc.RpcError, call).value
                refusals[name, action] = refused.code().name, refused.details()
    assert {key: code for key, (code, _) in refusals.items()} == {
        **{("user", action): "NOT_FOUND" for action in ("query", "stream", "wait")},
        ("user", "list"): "INVALID_ARGUMENT",
        **{("roleless", action): "PERMISSION_DENIED" for action in ("query", "stream", "wait", "list")}}
    entries = audit_entries(server)
    for (name, action), (code, message) in refusals.items():
        found = [e for e in entries if e["fingerprint"] == fingerprint(callers[name][0]) and e["action"] == action]
        assert len(found) == 1, (name, action, found)
        assert found[0] == dict(found[0], who=subjects[name], result=code, error=message,
                                job_id=None if action == "list" else missing), found[0]


def test_a_refused_start_of_a_huge_command_is_audited_in_an_entry_of_bounded_size(server, pki):
    """An observer's Start of 4 MiB of control characters: its entry keeps the command's first KiB, and its length and
    SHA-256 (of the arguments each ended by a NUL, as /proc/PID/cmdline holds them), in a few KiB."""
    cert, key = pki.leaf("huge-observer", "/O=jobworker/OU=observer/CN=huge")
    observer = server.client((cert, key))
    command = ["printf", bytes(range(1, 32)).decode() * (4 * MiB // 31 - 64)]
    audit = os.path.join(server.data_dir, "audit.log")
    before = os.path.getsize(audit)
    assert status_of(lambda: observer.start(command)).code == Code.PERMISSION_DENIED
    grown = os.path.getsize(audit) - before
    (entry,) = [e for e in audit_entries(server) if e["fingerprint"] == fingerprint(cert)]
    whole = b"".join(arg.encode() + b"\0" for arg in command)
    assert entry["command"] == ["printf", command[1][:1024 - len("printf")]]
    assert entry["command_bytes"] == len(whole) > 4_000_000 and entry["command_sha256"] == sha256(whole)
    assert grown <= 8 * 1024, f"{grown} bytes of audit log for one refused Start"


def test_a_burst_of_refusals_is_audited_up_to_its_bucket_and_the_rest_counted(server, pki):
    """One caller's refusals in a burst: the first BURST are written, then RATE a second at most, the rest counted; the
    caller's next entry written says how many were not; another caller's refusal during the burst is written."""
    burst, rate = jobworker.RefusalLimit.BURST, jobworker.RefusalLimit.RATE
    certificates = {name: pki.leaf(f"burst-{name}", f"/O=jobworker/OU=user/CN={name}") for name in ("noisy", "other")}
    clients = {name: server.client(credentials) for name, credentials in certificates.items()}
    calls = collections.Counter()

    def refused(name):
        calls[name] += 1
        return status_of(lambda: clients[name].query(str(uuid.uuid4()))).code == Code.NOT_FOUND

    def audited(name):
        return [e for e in audit_entries(server) if e["fingerprint"] == fingerprint(certificates[name][0])]

    began = time.monotonic()
    assert all(refused("noisy") for _ in range(2 * burst))
    assert refused("other")
    assert all(refused("noisy") for _ in range(burst))
    elapsed = time.monotonic() - began
    written = audited("noisy")
    assert burst <= len(written) <= burst + elapsed * rate, (len(written), elapsed)
    assert [e["unwritten_before"] for e in written[:burst]] == [0] * burst
    assert [e["result"] for e in audited("other")] == ["NOT_FOUND"]
    assert wait_until(lambda: refused("noisy") and len(audited("noisy")) > len(written), timeout=30), \
        "no refusal written once the bucket had a token again"
    written = audited("noisy")
    assert written[-1]["unwritten_before"] > 0
    assert len(written) + sum(e["unwritten_before"] for e in written) == calls["noisy"]


def test_refusal_limit_forgets_the_least_recently_refused_caller_first_with_its_count():
    limit = jobworker.RefusalLimit()
    limit.CALLERS = 2
    taken = [limit.take(("a", "A"), 0.0) for _ in range(limit.BURST + 3)]
    assert [written for written, _, _ in taken] == [True] * limit.BURST + [False] * 3
    assert limit.take(("b", "B"), 0.0) == (True, 0, [])
    assert limit.take(("a", "A"), 1.0 / limit.RATE) == (True, 3, [])  # a token again: its count, in its entry
    assert limit.take(("a", "A"), 1.0 / limit.RATE)[0] is False
    assert limit.take(("c", "C"), 1.0 / limit.RATE) == (True, 0, [])  # b forgotten: it had nothing unwritten
    assert limit.take(("d", "D"), 1.0 / limit.RATE) == (True, 0, [("a", "A", 1)])
    assert limit.counts() == [] and limit.take(("a", "A"), 2.0)[:2] == (True, 0)


# ---------------------------------------------------------------------------------------------------------------------
# History: each job's record, a restart, retention, Remove, the output cap, a full disk, List's pages
# ---------------------------------------------------------------------------------------------------------------------

def job_dir(server, job_id):
    return os.path.join(server.data_dir, "jobs", job_id)


def read_record(server, job_id):
    with open(os.path.join(job_dir(server, job_id), "record.json")) as f:
        return json.load(f)


def write_record(server, job_id, record):
    with open(os.path.join(job_dir(server, job_id), "record.json"), "w") as f:
        json.dump(record, f)


def tagged_output(stub, job_id):
    """Every byte of a job's output with its source, in arrival order."""
    return [(m.source, byte) for m in stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60) for byte in m.data]


def assert_streams_from_every_offset(stub, job_id, tagged, status):
    for offset in range(len(tagged) + 1):
        ran = read_stream(stub, job_id, offset)
        assert ran.out == bytes(b for source, b in tagged[offset:] if source == pb.StreamResponse.STDOUT), offset
        assert ran.err == bytes(b for source, b in tagged[offset:] if source == pb.StreamResponse.STDERR), offset
        assert ran.status == status
    assert status_of(lambda: read_stream(stub, job_id, len(tagged) + 1)).code == Code.OUT_OF_RANGE


def audit_entries(server):
    with open(os.path.join(server.data_dir, "audit.log")) as f:
        return [json.loads(line) for line in f]


BINARY_JOB = py("import sys\ndata = bytes(range(256)) * 64\nsys.stdout.buffer.write(data); sys.stdout.flush()\n"
                "sys.stderr.buffer.write(data[::-1])\nraise SystemExit(3)")


def test_restart_after_sigterm_keeps_every_job_and_the_running_one_says_it_was_stopped(pki, tmp_path,
                                                                                        job_directory):
    first = Server(pki, str(tmp_path / "first"))
    admin = first.client()
    small = admin.start(["sh", "-c", "printf abc; printf DEF >&2; printf ghi; exit 3"], env={"GREETING": "hi"},
                        working_directory=job_directory)
    binary = admin.start(BINARY_JOB)
    before = {job_id: read_stream(admin.stub, job_id) for job_id in (small, binary)}
    tagged = tagged_output(admin.stub, small)
    running = admin.start(["sh", "-c", "echo ready; exec sleep 600"])
    wait_for_output(admin.stub, running, b"ready\n")
    audited = audit_entries(first)
    assert first.stop() == 0

    second = Server(pki, str(tmp_path / "second"), data_dir=first.data_dir)
    admin = second.client()
    for job_id, ran in before.items():
        assert admin.query(job_id) == ran.status
        assert read_stream(admin.stub, job_id)[:2] == ran[:2]  # stdout and stderr, byte-exact and apart
        assert admin.stub.Wait(pb.WaitRequest(job_id=job_id), timeout=10) == ran.status  # at once: it has ended
    assert dict(before[small].status.env) == {"GREETING": "hi"}
    assert before[small].status.working_directory == job_directory
    assert_streams_from_every_offset(admin.stub, small, tagged, before[small].status)
    stopped = read_stream(admin.stub, running)
    assert stopped.out == b"ready\n" and stopped.status.state == pb.STOPPED
    assert stopped.status.signal == signal.SIGTERM and stopped.status.ended_at.seconds > 0
    assert [status.job_id for status in admin.list()] == [running, binary, small]
    admin.stop(running)  # an ended job: audited by the second server, after the first's entries
    entries = audit_entries(second)
    assert entries[:len(audited)] == audited and [e["job_id"] for e in audited if e["action"] == "start"] == \
        [small, binary, running]
    assert entries[-1]["action"] == "stop" and entries[-1]["job_id"] == running


def test_restart_after_sigkill_finds_the_running_job_lost_with_its_output(pki, tmp_path, gate):
    first = Server(pki, str(tmp_path / "first"))
    admin = first.client()
    ended = read_stream(admin.stub, admin.start(BINARY_JOB))
    label = marker()
    running = admin.start(py(f"# {label}\nimport sys\nsys.stdout.write('to out\\n'); sys.stdout.flush()\n"
                             f"sys.stderr.write('to err\\n'); sys.stderr.flush()\n" + gate.hold(before="")))
    assert wait_until(lambda: admin.query(running).output_bytes == 14)
    pidfds = [os.pidfd_open(pid) for pid in processes_with(label)]
    assert pidfds
    jobs_dir = os.path.join(first.data_dir, "jobs")
    unused = {name for name in os.listdir(jobs_dir) if not os.path.exists(os.path.join(jobs_dir, name, "record.json"))}
    assert unused, "the first server had no ready init: the test proves nothing about their directories"
    first.stop(signal.SIGKILL)
    for pidfd in pidfds:
        assert select.select([pidfd], [], [], 30)[0], "a job outlived its server"
        os.close(pidfd)

    second = Server(pki, str(tmp_path / "second"), data_dir=first.data_dir)
    admin = second.client()
    lost = read_stream(admin.stub, running)
    assert (lost.out, lost.err) == (b"to out\n", b"to err\n")
    status = lost.status
    assert status.state == pb.LOST and not status.HasField("exit_code") and status.output_bytes == 14
    assert status.ended_at.ToNanoseconds() >= status.started_at.ToNanoseconds() > 0
    assert admin.query(ended.status.job_id) == ended.status
    assert read_stream(admin.stub, ended.status.job_id)[:2] == ended[:2]
    assert not [s for s in admin.list() if s.state == pb.RUNNING], "a job of the killed server is said to run"
    assert not unused & set(os.listdir(jobs_dir)), "the killed server's unused inits' directories were kept"
    assert [e["job_id"] for e in audit_entries(second) if e["action"] == "start"] == [ended.status.job_id, running]
    assert second.stop() == 0

    third = Server(pki, str(tmp_path / "third"), data_dir=first.data_dir)  # the second wrote it down as LOST
    assert third.client().query(running) == status
    assert third.client().stub.Wait(pb.WaitRequest(job_id=running), timeout=10) == status


def test_a_record_that_cannot_be_read_is_logged_and_skipped(pki, tmp_path):
    first = Server(pki, str(tmp_path / "first"))
    admin = first.client()
    ids = [run_job(admin, ["echo", str(i)]).status.job_id for i in range(5)]
    assert first.stop() == 0
    with open(os.path.join(job_dir(first, ids[0]), "record.json"), "wb") as f:
        f.write(b'{"version": 1, "job_id": ')  # cut short
    write_record(first, ids[1], dict(read_record(first, ids[1]), version=99))
    write_record(first, ids[2], dict(read_record(first, ids[2]), job_id=ids[3]))
    write_record(first, ids[3], dict(read_record(first, ids[3]), state="HAPPY"))

    second = Server(pki, str(tmp_path / "second"), data_dir=first.data_dir)
    admin = second.client()
    log = second.read_log()
    for job_id in ids[:4]:
        assert f"job {job_id}: cannot read its record, skipped" in log, log[-3000:]
        assert status_of(lambda: admin.query(job_id)).code == Code.NOT_FOUND
        assert os.path.isdir(job_dir(first, job_id)), "a record that could not be read was deleted"
    assert "record format 99 (this server reads 1 and 2)" in log and "Traceback" not in log
    assert read_stream(admin.stub, ids[4]).out == b"4\n"


def test_a_job_recorded_with_its_owners_cn_alone_is_nobodys_after_the_upgrade(pki, tmp_path):
    """A record of format 1 named the owner by its CN alone, which cannot say which of the subjects with that CN it
    was: the job is loaded as nobody's, which the roles that see every job see (with an empty owner, `-` in a table)
    and a user with that CN does not."""
    first = Server(pki, str(tmp_path / "first"))
    job_id = run_job(first.client("user"), ["echo", "old"]).status.job_id
    assert first.stop() == 0
    record = read_record(first, job_id)
    assert record["version"] == 2 and record["owner"] == SUBJECT["user"]
    write_record(first, job_id, dict(record, version=1, owner="alice"))  # as a server of format 1 wrote it

    second = Server(pki, str(tmp_path / "second"), data_dir=first.data_dir)
    user = second.client("user")
    assert status_of(lambda: user.query(job_id)).code == Code.NOT_FOUND and user.list() == []
    for role in ("admin", "observer"):
        assert second.client(role).query(job_id).owner == ""
    header, row = second.cli("query", job_id).stdout.decode().splitlines()
    assert columns(row, header)[3] == "-"
    admin = second.client("admin")
    assert admin.list(owner="alice") == [] and admin.list(owner=SUBJECT["user"]) == []
    assert admin.remove(job_id).job_id == job_id


def test_symbolic_links_in_a_jobs_directory_are_never_followed_at_restart_or_removal(pki, tmp_path):
    """Job directories in which the record, the record's temporary file or the output is a symbolic link to a file
    outside the data directory, or which are one: at a restart nothing outside is read, truncated or removed (the job
    is logged and skipped, or its record made anew beside the link), nor when a job holding such links is removed."""
    first = Server(pki, str(tmp_path / "first"))
    names = ("record", "temporary", "output", "directory", "holding links")
    ids = {name: run_job(first.client(), ["echo", name]).status.job_id for name in names}
    assert first.stop() == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    directory = {name: pathlib.Path(job_dir(first, job_id)) for name, job_id in ids.items()}

    def link(path, content):
        """Replaces `path` by a link to a file outside with `content`."""
        target = outside / f"{path.parent.name}-{path.name}"
        target.write_bytes(content)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        path.symlink_to(target)

    link(directory["record"] / "record.json", (directory["record"] / "record.json").read_bytes())
    write_record(first, ids["temporary"], dict(read_record(first, ids["temporary"]), state="RUNNING"))  # made LOST
    link(directory["temporary"] / "record.json.new", b"precious\n")
    link(directory["output"] / "output", b"secret\n")
    shutil.copytree(directory["directory"], outside / "directory")
    shutil.rmtree(directory["directory"])
    directory["directory"].symlink_to(outside / "directory")
    link(directory["holding links"] / "a-link", b"precious too\n")
    (directory["holding links"] / "a-directory-link").symlink_to(outside / "directory")
    contents = lambda: {str(path): path.read_bytes() for path in outside.rglob("*") if path.is_file()}
    before = contents()

    second = Server(pki, str(tmp_path / "second"), data_dir=first.data_dir)
    admin = second.client()
    for name in ("record", "output", "directory"):
        said = [line for line in second.read_log().splitlines() if f"job {ids[name]}: " in line]
        assert len(said) == 1 and "cannot read its record, skipped" in said[0] and \
            "is a symbolic link, which is not followed" in said[0], (name, said)
        assert status_of(lambda: admin.query(ids[name])).code == Code.NOT_FOUND, name
    assert admin.query(ids["temporary"]).state == pb.LOST
    assert read_stream(admin.stub, ids["holding links"]).out == b"holding links\n"
    for name in ("temporary", "holding links"):
        admin.remove(ids[name])
        assert not directory[name].exists()
    assert contents() == before, "a file outside the data directory was changed or removed through a link"


@needs_root
def test_a_data_directory_that_is_not_the_servers_alone_is_refused_at_start(pki, tmp_path):
    """A data directory, or a jobs directory in it, owned by another user, writable by group or others, or a symbolic
    link, and an audit log that is a symbolic link: the server refuses to start, in one line saying which and why, and
    touches nothing it would have reached through them."""
    outside = tmp_path / "outside"
    (outside / "a-directory").mkdir(parents=True)
    (outside / "a-directory" / "a-file").write_text("precious\n")
    (outside / "a-file").write_text("precious\n")
    nobody = pwd.getpwnam("nobody").pw_uid
    alone = "the data directory and its jobs directory must be the server's user's alone"

    def data_dir(name, jobs=False):
        """A data directory of the server's user alone (with a jobs directory, if asked), to spoil."""
        path = tmp_path / name
        path.mkdir(mode=0o700)
        if jobs:
            (path / "jobs").mkdir(mode=0o700)
        return path

    cases = []
    spoilt = data_dir("owned by nobody")
    os.chown(spoilt, nobody, nobody)
    cases.append((spoilt, f"{spoilt} is owned by uid {nobody}, not by this server's (uid 0); {alone}"))
    spoilt = data_dir("writable by anyone")
    os.chmod(spoilt, 0o777)
    cases.append((spoilt, f"{spoilt} is writable by group or others (mode 0777); {alone}"))
    spoilt = tmp_path / "a link"
    spoilt.symlink_to(data_dir("linked to"))
    cases.append((spoilt, f"{spoilt} is a symbolic link; {alone}"))
    spoilt = data_dir("jobs owned by nobody", jobs=True)
    os.chown(spoilt / "jobs", nobody, nobody)
    cases.append((spoilt, f"{spoilt / 'jobs'} is owned by uid {nobody}, not by this server's (uid 0); {alone}"))
    spoilt = data_dir("jobs writable by its group", jobs=True)
    os.chmod(spoilt / "jobs", 0o770)
    cases.append((spoilt, f"{spoilt / 'jobs'} is writable by group or others (mode 0770); {alone}"))
    spoilt = data_dir("jobs a link")
    (spoilt / "jobs").symlink_to(outside)  # whose directories a server would remove as unused inits' ones
    cases.append((spoilt, f"{spoilt / 'jobs'} is a symbolic link; {alone}"))
    spoilt = data_dir("audit log a link", jobs=True)
    (spoilt / "audit.log").symlink_to(outside / "a-file")
    cases.append((spoilt, f"cannot open the audit log in {spoilt}: audit.log is a symbolic link, which is not "
                          "followed"))
    cert, key = pki.server
    for path, message in cases:
        serving = subprocess.Popen([sys.executable, JOBWORKER, "serve", "--addr", "127.0.0.1:0", "--cert", cert,
                                    "--key", key, "--ca", pki.ca_cert, "--data-dir", str(path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        listening = serving.stdout.readline()  # empty once it has exited
        if listening:
            serving.terminate()
        _, err = serving.communicate(timeout=60)
        assert not listening and serving.returncode == 1, (path, listening)
        assert err.decode().splitlines()[-1] == f"jobworker: {message}" and b"Traceback" not in err, err
    assert (outside / "a-file").read_text() == (outside / "a-directory" / "a-file").read_text() == "precious\n"


def test_the_data_directory_is_made_0700_and_the_audit_log_kept_0600(pki, tmp_path):
    fresh = Server(pki, str(tmp_path / "fresh"))
    mode = lambda path: stat.S_IMODE(os.stat(path).st_mode)
    assert mode(fresh.data_dir) == mode(os.path.join(fresh.data_dir, "jobs")) == 0o700
    assert mode(os.path.join(fresh.data_dir, "audit.log")) == 0o600
    older = tmp_path / "older"
    older.mkdir(mode=0o700)
    (older / "audit.log").write_text("")
    os.chmod(older / "audit.log", 0o644)  # as one made by hand, or copied, may be
    Server(pki, str(tmp_path / "server"), data_dir=str(older))
    assert mode(older / "audit.log") == 0o600


def test_retention_keeps_the_newest_ended_jobs_and_never_a_running_one(pki, tmp_path, gate):
    server = Server(pki, str(tmp_path), "--keep-jobs", "2")
    admin = server.client()
    held = admin.start(py(gate.hold()))  # the oldest job, running throughout
    wait_for_output(admin.stub, held, b"ready\n")
    ended = [run_job(admin, ["echo", str(i)]).status.job_id for i in range(5)]
    listed = lambda: [status.job_id for status in admin.list()]
    assert wait_until(lambda: listed() == [ended[4], ended[3], held]), listed()
    for job_id in ended[:3]:
        assert status_of(lambda: admin.query(job_id)).code == Code.NOT_FOUND
        assert wait_until(lambda: not os.path.exists(job_dir(server, job_id))), "a removed job's output was kept"
    gate.open()
    assert read_stream(admin.stub, held).status.exit_code == 0
    assert wait_until(lambda: listed() == [ended[4], held]), listed()  # ended[3] ended before the held job
    assert wait_until(lambda: not os.path.exists(job_dir(server, ended[3])))


def test_retention_removes_jobs_ended_longer_ago_than_keep_for(pki, tmp_path):
    first = Server(pki, str(tmp_path / "first"))
    admin = first.client()
    ids = [run_job(admin, ["echo", str(i)]).status.job_id for i in range(4)]
    assert first.stop() == 0
    now, day = time.time(), 86400
    for job_id, ended_at in zip(ids, (now - 8 * day, now - 6 * day, now - 7 * day + 5, now)):
        write_record(first, job_id, dict(read_record(first, job_id), ended_at=ended_at))

    second = Server(pki, str(tmp_path / "second"), data_dir=first.data_dir)  # 7 days, the default
    admin = second.client()
    found = lambda job_id: status_of(lambda: admin.query(job_id)).code == OK
    assert wait_until(lambda: not found(ids[0])), "a job ended 8 days ago was kept"
    assert wait_until(lambda: not found(ids[2])), "a job was kept past its 7 days, with the server idle"
    assert found(ids[1]) and found(ids[3])
    kept = lambda: [os.path.exists(job_dir(first, job_id)) for job_id in ids]
    assert wait_until(lambda: kept() == [False, True, False, True]), kept()
    assert second.stop() == 0

    third = Server(pki, str(tmp_path / "third"), "--keep-for", "5d", data_dir=first.data_dir)
    admin = third.client()
    assert wait_until(lambda: not found(ids[1])), "a job ended 6 days ago was kept for 5"
    assert found(ids[3])


def test_remove_for_each_role_and_a_running_job_refused(server):
    clients = {role: server.client(role) for role in ("admin", "user", "user2", "observer")}
    cases = [("admin", "user", OK), ("user", "user", OK), ("admin", "admin", OK), ("user", "admin", Code.NOT_FOUND),
             ("user2", "user", Code.NOT_FOUND), ("observer", "admin", Code.PERMISSION_DENIED)]
    for caller, owner, expected in cases:
        job_id = run_job(clients[owner], ["echo", "x"]).status.job_id
        removal = status_of(lambda: clients[caller].remove(job_id))
        assert removal.code == expected, (caller, owner)
        if expected == OK:
            assert removal.response.job_id == job_id and removal.response.state == pb.EXITED
            assert status_of(lambda: clients["admin"].query(job_id)).code == Code.NOT_FOUND
            assert not os.path.exists(job_dir(server, job_id))
            assert status_of(lambda: clients[caller].remove(job_id)).code == Code.NOT_FOUND
        else:
            assert clients["admin"].query(job_id).state == pb.EXITED
    running = clients["user"].start(["sleep", "600"])
    for role in ("admin", "user"):
        assert status_of(lambda: clients[role].remove(running)).code == Code.FAILED_PRECONDITION
    clients["user"].stop(running, force=True)
    entries = [e for e in audit_entries(server) if e["action"] == "remove"]
    assert {(e["who"], e["result"]) for e in entries} >= {
        (SUBJECT["admin"], "OK"), (SUBJECT["user"], "OK"), (SUBJECT["user2"], "NOT_FOUND"),
        (SUBJECT["observer"], "PERMISSION_DENIED")}
    assert entries[-1] == dict(entries[-1], who=SUBJECT["user"], job_id=running, result="FAILED_PRECONDITION")
    assert server.cli("remove", running).returncode == 0
    assert status_of(lambda: clients["admin"].query(running)).code == Code.NOT_FOUND
    refused = server.cli("remove", running)
    assert refused.returncode == 1 and refused.stderr.decode().startswith("NOT_FOUND: ")


def test_a_stream_of_a_job_removed_while_it_is_read_ends_with_not_found(admin):
    size = 64 * MiB  # more than a stream's flow-control windows hold: the server is mid-stream at the removal
    job_id = admin.start(["head", "-c", str(size), "/dev/zero"])
    assert read_stream(admin.stub, job_id, keep=False).size == size
    call = admin.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60)
    received = len(next(call).data)
    admin.remove(job_id)
    with pytest.raises(grpc.RpcError) as ended:
        for message in call:
            received += len(message.data)
    assert ended.value.code() == Code.NOT_FOUND and "removed" in ended.value.details()
    assert received < size


def test_output_past_the_cap_is_dropped_and_counted_and_the_job_runs_on(pki, tmp_path):
    server = Server(pki, str(tmp_path), "--max-output", "1M")
    admin = server.client()
    command = py(PATTERN_JOB.format(blocks=3, size=MiB) + "out.flush()\nsys.stderr.write('end')\nraise SystemExit(7)")
    ran = run_job(admin, command)
    assert ran.status.exit_code == 7, "the job did not run to its end"
    assert ran.out == pattern(3)[:MiB] and ran.err == b""
    assert ran.status.output_bytes == MiB and ran.status.output_dropped_bytes == 2 * MiB + 3
    assert os.path.getsize(output_path(server, ran.status.job_id)) == MiB
    assert admin.query(ran.status.job_id) == ran.status
    streamed = server.cli("stream", ran.status.job_id)
    assert streamed.returncode == 7 and streamed.stdout == ran.out
    assert streamed.stderr.decode() == f"jobworker: {2 * MiB + 3} bytes more of the job's output were dropped " \
                                       "(past the server's --max-output, or on a full disk)\n"
    header, row = server.cli("query", ran.status.job_id).stdout.decode().splitlines()
    assert columns(row, header)[6] == "1.0 MiB (+2.0 MiB dropped)"  # the OUTPUT column: kept, and dropped


@needs_root
def test_a_full_disk_drops_output_refuses_starts_and_every_other_job_streams_on(pki, tmp_path, gate):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "jobworker-test", str(disk)], check=True)
    try:
        server = Server(pki, str(tmp_path / "server"), "--min-free", "2M", data_dir=str(disk / "data"))
        try:
            admin = server.client()
            streamed = admin.start(py(PATTERN_JOB.format(blocks=1, size=MiB) + gate.hold(before="out.flush()\n")
                                      + "print('after')"))
            attached = threading.Barrier(2)
            reader = Concurrently([lambda: read_stream(admin.stub, streamed, first=lambda: attached.wait(60))],
                                  (attached,))
            reader.meet(attached)
            wait_for_output(admin.stub, streamed, pattern(1))
            filler = run_job(admin, ["head", "-c", str(16 * MiB), "/dev/zero"])
            status = filler.status
            assert status.exit_code == 0 and status.output_bytes == filler.size == os.path.getsize(
                output_path(server, status.job_id))
            assert status.output_dropped_bytes > 0 and status.output_bytes + status.output_dropped_bytes == 16 * MiB
            refused = pytest.raises(grpc.RpcError, admin.start, ["true"]).value
            assert refused.code() == Code.RESOURCE_EXHAUSTED and "--min-free" in refused.details()
            gate.open()
            (ran,) = reader.results()
            assert ran.out == pattern(1) and ran.status.exit_code == 0
            assert ran.status.output_dropped_bytes == len(b"after\n")
            assert server.read_log().count("file system is full") == 1
            admin.remove(status.job_id)
            assert run_job(admin, ["echo", "room again"]).out == b"room again\n"
        finally:
            assert server.stop() == 0, server.read_log()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_list_pages_filters_and_cuts_huge_commands(pki, tmp_path):
    server = Server(pki, str(tmp_path))
    admin, user, observer = (server.client(role) for role in ("admin", "user", "observer"))
    huge = ["true"] + ["y" * 100_000] * 19  # 1.9 MB
    ids = [admin.start(huge) for _ in range(40)] + [user.start(["echo", str(i)]) for i in range(5)]
    running = user.start(["sleep", "600"])
    for job_id in ids:  # each ended, as a state filter below expects
        admin.wait(job_id)
    newest_first = [running] + ids[::-1]
    for client in (admin, observer):
        response = client.stub.List(pb.ListRequest(), timeout=60)
        assert [s.job_id for s in response.jobs] == newest_first and not response.next_page_token
        assert response.ByteSize() < 100_000
        for status in response.jobs[6:]:
            assert status.command_truncated and status.command[0] == "true"
            assert sum(len(arg.encode()) for arg in status.command) == 1024
        assert not any(status.command_truncated for status in response.jobs[:6])
    assert list(admin.query(ids[0]).command) == huge and not admin.query(ids[0]).command_truncated
    pages, token = [], ""
    while True:
        response = observer.stub.List(pb.ListRequest(page_size=7, page_token=token), timeout=60)
        pages.append([s.job_id for s in response.jobs])
        token = response.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [7] * 6 + [4] and sum(pages, []) == newest_first
    assert [s.job_id for s in admin.list(state=pb.RUNNING)] == [running]
    assert [s.job_id for s in observer.list(owner=SUBJECT["user"])] == newest_first[:6]
    assert observer.list(owner="alice") == [], "an owner is its whole subject, not its CN"
    assert [s.job_id for s in user.list()] == newest_first[:6] and user.list(owner=SUBJECT["admin"]) == []
    assert len(admin.list(state=pb.EXITED)) == 45 and len(admin.list(limit=3)) == 3
    for bad in (pb.ListRequest(page_size=1001), pb.ListRequest(page_token="x"), pb.ListRequest(page_token="-1"),
                pb.ListRequest(state=99)):
        assert status_of(lambda: admin.stub.List(bad, timeout=60)).code == Code.INVALID_ARGUMENT, bad
    ids += [admin.start(["true"]) for _ in range(10)]
    for job_id in ids[-10:]:
        admin.wait(job_id)
    shown = server.cli("list")
    header, *rows = shown.stdout.decode().splitlines()  # the table's header, then a job a line
    assert shown.returncode == 0 and header.startswith("JOB ID") and len(rows) == 50
    assert rows[0].startswith(ids[-1])
    assert shown.stderr == b"jobworker: the newest 50 shown; --limit N for more (0: all)\n"
    every = server.cli("list", "--limit", "0").stdout.decode().splitlines()[1:]
    assert len(every) == 56
    cut = {line.split()[0] for line in every if line.endswith(" …")}  # the COMMAND column marks a cut command
    assert cut == set(ids[:40])
    assert len(server.cli("list", "--limit", "5").stdout.splitlines()) == 1 + 5
    running_only = server.cli("list", "--state", "running").stdout.decode().splitlines()
    assert len(running_only) == 2 and running_only[1].startswith(running)
    admin.stop(running, force=True)


# ---------------------------------------------------------------------------------------------------------------------
# Roles and certificates (every kind of certificate against every RPC: the identity matrix, under Reliability)
# ---------------------------------------------------------------------------------------------------------------------

def test_role_matrix(server):
    clients = {role: server.client(role) for role in ("admin", "user", "user2", "observer")}
    DENIED, HIDDEN = Code.PERMISSION_DENIED, Code.NOT_FOUND
    everything = {"Query": OK, "Stream": OK, "Stop": OK, "Wait": OK, "Remove": OK}
    nothing = dict.fromkeys(everything, HIDDEN)
    watch_only = {"Query": OK, "Stream": OK, "Stop": DENIED, "Wait": OK, "Remove": DENIED}
    expected = {  # (caller, owner of the job) -> outcome of each call on that job
        ("admin", "admin"): everything, ("admin", "user"): everything,
        ("user", "user"): everything, ("user", "admin"): nothing, ("user2", "user"): nothing,
        ("observer", "admin"): watch_only, ("observer", "user"): watch_only,
    }
    for (caller, owner), outcomes in expected.items():
        for method, outcome in outcomes.items():
            job_id = clients[owner].start(["sh", "-c", "echo hi; sleep 600"])  # a fresh job: a Stop ends it
            if method in ("Wait", "Remove"):
                clients["admin"].stop(job_id, force=True)  # so that a Wait returns at once, and a Remove may remove it
            client = clients[caller]
            call = {"Query": lambda: client.query(job_id), "Stream": lambda: next(iter(client.stream(job_id))),
                    "Stop": lambda: client.stop(job_id, force=True), "Wait": lambda: client.wait(job_id),
                    "Remove": lambda: client.remove(job_id)}[method]
            assert status_of(call).code == outcome, (caller, owner, method)
            if method == "Remove":
                assert status_of(lambda: clients["admin"].query(job_id)).code == (HIDDEN if outcome == OK else OK)
            else:
                clients["admin"].stop(job_id, force=True)
    assert status_of(lambda: clients["admin"].start(["true"])).code == OK
    assert status_of(lambda: clients["user"].start(["true"])).code == OK
    refusal = pytest.raises(grpc.RpcError, clients["observer"].start, ["true"]).value
    assert refusal.code() == DENIED and refusal.details() == "observers cannot start jobs"
    owners = {role: {status.owner for status in clients[role].list()} for role in clients}
    assert owners["user"] == {SUBJECT["user"]} and owners["user2"] == set()
    assert {SUBJECT["admin"], SUBJECT["user"]} <= owners["admin"] and owners["observer"] == owners["admin"]


def test_a_certificate_with_anothers_cn_cannot_see_or_touch_their_jobs(server, pki):
    """A job's owner is the whole subject of the certificate that started it: a user certificate with the admin's CN
    (CN=ada, OU=user), or with a user's CN in another organisation, gets for that one's jobs, running or ended, the
    answer it gets for a job that does not exist; and lists none of them."""
    owners = {"admin": server.client("admin"), "user": server.client("user")}
    impostors = {"admin": server.client(pki.leaf("same-cn-as-admin", "/O=jobworker/OU=user/CN=ada")),
                 "user": server.client(pki.leaf("same-cn-elsewhere", "/O=elsewhere/OU=user/CN=alice"))}
    for victim, impostor in impostors.items():
        owner = owners[victim]
        running, ended = owner.start(["sleep", "600"]), owner.start(["true"])
        owner.wait(ended)
        stub = impostor.stub
        calls = {"Query": lambda job_id: stub.Query(pb.QueryRequest(job_id=job_id), timeout=10),
                 "Stream": lambda job_id: next(stub.Stream(pb.StreamRequest(job_id=job_id), timeout=10)),
                 "Wait": lambda job_id: stub.Wait(pb.WaitRequest(job_id=job_id), timeout=10),
                 "Stop": lambda job_id: stub.Stop(pb.StopRequest(job_id=job_id, force=True), timeout=10),
                 "Remove": lambda job_id: stub.Remove(pb.RemoveRequest(job_id=job_id), timeout=10)}
        for method, call in calls.items():
            nobodys = str(uuid.uuid4())
            absent = pytest.raises(grpc.RpcError, call, nobodys).value
            for job_id in (running, ended):
                refused = pytest.raises(grpc.RpcError, call, job_id).value
                assert (refused.code(), refused.details().replace(job_id, "ID")) == \
                    (absent.code(), absent.details().replace(nobodys, "ID")) == (Code.NOT_FOUND, "no job ID"), \
                    (victim, method, refused.code(), refused.details())
        assert {running, ended}.isdisjoint(status.job_id for status in impostor.list())
        assert impostor.list(owner=SUBJECT[victim]) == []
        assert owner.query(running).state == pb.RUNNING and owner.query(ended).state == pb.EXITED
        owner.stop(running, force=True)
    own = impostors["admin"].start(["true"])
    assert owners["admin"].query(own).owner == "O=jobworker,OU=user,CN=ada"  # told apart from the admin's


def test_a_cas_certificate_or_a_blank_cn_is_no_callers_identity(server, pki):
    """A certificate our CA signed with CA:TRUE (which could sign others), or whose CN is blank, is refused on every
    call, saying why; basicConstraints is read strictly from the DER: a cA TRUE not encoded as DER's 0xFF is refused
    as unreadable, not taken for either answer."""
    ca_leaf = pki.leaf("ca-as-client", "/O=jobworker/OU=admin/CN=root", is_ca=True)
    cases = {"the client certificate is a CA's (basicConstraints CA:TRUE), which is no caller's identity": ca_leaf,
             "the client certificate's CN is blank": pki.leaf("blank-cn", "/O=jobworker/OU=admin/CN=  ")}
    for message, credentials in cases.items():
        channel, stub = open_channel(server, credentials)
        with channel:
            for call in (lambda: stub.Start(pb.StartRequest(command=["true"]), timeout=10),
                         lambda: stub.List(pb.ListRequest(), timeout=10)):
                refused = pytest.raises(grpc.RpcError, call).value
                assert (refused.code(), refused.details()) == (Code.UNAUTHENTICATED, message)
    der = ssl.PEM_cert_to_DER_cert(pathlib.Path(ca_leaf[0]).read_text())
    assert jobworker.read_certificate(memoryview(der))[1] is True
    leaf_der = ssl.PEM_cert_to_DER_cert(pathlib.Path(pki.roles["admin"][0]).read_text())
    assert jobworker.read_certificate(memoryview(leaf_der))[1] is False
    basic_constraints = bytes.fromhex("0603551d130101ff040530030101ff")  # critical, cA TRUE
    assert der.count(basic_constraints) == 1
    with pytest.raises(ValueError, match="basicConstraints"):
        jobworker.read_certificate(memoryview(der.replace(basic_constraints, basic_constraints[:-1] + b"\x01")))


def test_a_caller_past_its_running_jobs_cap_is_refused_while_other_callers_and_admins_still_start(pki, tmp_path):
    server = Server(pki, str(tmp_path), "--max-running-per-caller", "2")
    user, admin = server.client("user"), server.client("admin")
    held = [user.start(["sleep", "600"]) for _ in range(2)]
    refusal = pytest.raises(grpc.RpcError, user.start, ["true"]).value
    assert refusal.code() == Code.RESOURCE_EXHAUSTED
    assert refusal.details() == ("O=jobworker,OU=user,CN=alice has 2 jobs running, the most a caller may have at once "
                                 "on this server: wait for one to end, or stop one")
    assert run_job(server.client("user2"), ["true"]).status.exit_code == 0
    held += [admin.start(["sleep", "600"]) for _ in range(3)]  # admins are not held to it
    assert user.stop(held[0], force=True).state == pb.STOPPED
    assert run_job(user, ["true"]).status.exit_code == 0  # the stopped job's place is free again
    for job_id in held:
        admin.stop(job_id, force=True)


def test_subject_parser_refuses_malformed_der():
    truncated = bytes.fromhex("3082")
    for der in (truncated, b"", b"\x30\x80", b"\x30\x84\x00\x00\x00\x01\x00", b"\x30\x81\x05abcde"):
        with pytest.raises((ValueError, IndexError)):
            jobworker.read_certificate(memoryview(der))


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
        self.context = tls_context(server.pki, role, version)
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


def test_tls_1_2_offers_only_ecdhe_aead_suites(server):
    context = tls_context(server.pki, "admin", ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:AES128-GCM-SHA256:AES128-SHA")  # none of those
    with pytest.raises(ssl.SSLError):
        with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="localhost"):
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
    stopped = server.cli("stop", "--timeout", "30", "--json", sleeper_id)
    assert json.loads(stopped.stdout)["state"] == "STOPPED"
    signalled = server.cli("stream", sleeper_id)
    assert signalled.returncode == 128 + signal.SIGTERM
    forced = server.cli("stop", "--force", server.cli("start", "--", "sleep", "600").stdout.decode().strip())
    assert forced.returncode == 0 and b"STOPPED" in forced.stdout


def job_with(client, label):
    """The status of the job whose command line holds `label`."""
    (status,) = [status for status in client.list() if label in " ".join(status.command)]
    return status


def stops_of(server, job_id):
    """Whether each Stop of a job was forced, graceful ones first (the audit log has them as they returned)."""
    with open(os.path.join(server.data_dir, "audit.log")) as f:
        entries = [json.loads(line) for line in f]
    return sorted(entry["force"] for entry in entries if entry["action"] == "stop" and entry["job_id"] == job_id)


def test_cli_run_writes_the_output_and_exits_with_the_jobs_status(server, admin):
    ran = server.cli("run", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 5")
    assert (ran.stdout, ran.stderr, ran.returncode) == (b"to-out\n", b"to-err\n", 5)
    assert server.cli("run", "true").returncode == 0
    killed = server.cli("run", "--", "sh", "-c", "kill -KILL $$")
    assert (killed.stdout, killed.stderr, killed.returncode) == (b"", b"", 128 + signal.SIGKILL)
    detached = server.cli("run", "--detach", "--", "sh", "-c", "exit 4")
    job_id = detached.stdout.decode().strip()
    assert detached.returncode == 0 and detached.stdout == f"{job_id}\n".encode()
    assert admin.wait(job_id).exit_code == 4
    refused = server.cli("run", "--", "/no/such/program")
    assert refused.returncode == 1 and refused.stderr.startswith(b"INVALID_ARGUMENT: ")
    assert len(refused.stderr.splitlines()) == 1 and not refused.stdout
    empty = server.cli("run", "--")
    assert empty.returncode == 2 and empty.stderr.startswith(b"jobworker: run: ") and not empty.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_run_stops_the_job_gracefully_at_a_first_ctrl_c_or_sigterm(server, admin, sig):
    label = marker()
    cli = subprocess.Popen(server.cli_argv("run", "--", "sh", "-c", f"trap 'echo got TERM; exit 7' TERM; echo ready; "
                                                                  f"sleep {label} & wait"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert read_exactly(cli.stdout, 6) == b"ready\n"  # the job runs, and the CLI has its handlers in place
    cli.send_signal(sig)
    out, err = cli.communicate(timeout=60)
    assert (out, err, cli.returncode) == (b"got TERM\n", b"", 7)  # the output came on to the job's end
    status = job_with(admin, label)
    assert status.state == pb.STOPPED and status.exit_code == 7
    assert stops_of(server, status.job_id) == [False]


def test_cli_run_kills_the_job_at_a_second_ctrl_c(server, admin):
    label = marker()
    code = (f"# {label}\nimport signal\nsignal.signal(signal.SIGTERM, lambda *_: print('got TERM', flush=True))\n"
            "print('ready', flush=True)\nwhile True:\n    signal.pause()\n")
    cli = subprocess.Popen(server.cli_argv("run", "--", *py(code)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert read_exactly(cli.stdout, 6) == b"ready\n"
    cli.send_signal(signal.SIGINT)
    assert read_exactly(cli.stdout, 9) == b"got TERM\n"  # the graceful Stop has reached the job, which goes on
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=60)
    assert (out, err, cli.returncode) == (b"", b"", 128 + signal.SIGKILL)
    status = job_with(admin, label)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    assert stops_of(server, status.job_id) == [False, True]
    assert processes_with(label) == []


def test_cli_run_leaves_at_a_third_ctrl_c_when_the_server_does_not_answer(pki, tmp_path):
    """On a terminal, each Ctrl-C says what it did (and so the test knows when the CLI has had it: signals sent at
    once would arrive as one)."""
    server = Server(pki, str(tmp_path))
    ours, its_end = os.openpty()
    cli = subprocess.Popen(server.cli_argv("run", "--", "sh", "-c", f"echo ready; sleep {marker()}"),
                           stdout=subprocess.PIPE, stderr=its_end)
    os.close(its_end)
    terminal = os.fdopen(ours, "rb")
    try:
        assert read_exactly(cli.stdout, 6) == b"ready\n"
        server.proc.send_signal(signal.SIGSTOP)  # a server that has hung
        try:
            for said in (b"stopping the job (again to kill it)", b"killing the job (again to leave without waiting)"):
                cli.send_signal(signal.SIGINT)
                line = b"jobworker: " + said + b"\r\n"
                assert read_exactly(terminal, len(line)) == line  # a read may return part of it
            cli.send_signal(signal.SIGINT)
            assert cli.wait(60) == 130 and cli.stdout.read() == b""
        finally:
            server.proc.send_signal(signal.SIGCONT)
    finally:
        terminal.close()
        cli.stdout.close()


def test_cli_run_stops_the_job_when_its_reader_goes_away(server, admin):
    label = marker()
    cli = subprocess.Popen(server.cli_argv("run", "--", "yes", label), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert read_exactly(cli.stdout, len(label) + 1) == f"{label}\n".encode()
    cli.stdout.close()  # as `head -1` would
    err = cli.stderr.read()
    assert cli.wait(60) == 141 and err == b""
    status = job_with(admin, label)
    assert status.state == pb.STOPPED and status.signal == signal.SIGTERM
    assert stops_of(server, status.job_id) == [False]


def test_cli_start_and_run_give_the_job_variables_and_a_working_directory(server, job_directory):
    here = dict(os.environ, FROM_HERE="passed on")
    ran = subprocess.run(server.cli_argv("run", "-e", "A=1", "--env", "B=x=y", "-e", "A=2", "-e", "FROM_HERE",
                                         "--workdir", job_directory, "--", "sh", "-c", 'echo "$A $B $FROM_HERE"; pwd'),
                         env=here, capture_output=True, timeout=60)
    assert (ran.stdout, ran.stderr, ran.returncode) == (f"2 x=y passed on\n{job_directory}\n".encode(), b"", 0)
    started = server.cli("start", "-e", "A=1", "--workdir", job_directory, "--", "true")
    status = json.loads(server.cli("wait", "--json", started.stdout.decode().strip()).stdout)
    assert status["env"] == {"A": "1"} and status["working_directory"] == job_directory
    cases = [
        (("start", "-e", f"UNSET_{marker()}", "--", "true"), 2, "jobworker: start: "),
        (("run", "-e", "=x", "--", "true"), 1, "INVALID_ARGUMENT: not a variable name: ''"),
        (("run", "--workdir", "/no/such/directory", "--", "true"), 1,
         "INVALID_ARGUMENT: cannot enter the working directory '/no/such/directory': No such file or directory"),
        (("start", "--workdir", "relative", "--", "true"), 1, "INVALID_ARGUMENT: the working directory must be "),
    ]
    for argv, code, said in cases:
        result = server.cli(*argv)
        assert result.returncode == code and not result.stdout, (argv, result)
        assert len(result.stderr.splitlines()) == 1 and result.stderr.decode().startswith(said), (argv, result)


def test_cli_wait_exits_with_the_status_of_a_job_once_it_has_ended(server, admin, gate):
    job_id = admin.start(py(gate.hold() + "raise SystemExit(9)"))
    wait_for_output(admin.stub, job_id, b"ready\n")
    connections = connections_to(server)
    waiting = subprocess.Popen(server.cli_argv("wait", job_id), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_until(lambda: connections_to(server) > connections), "the CLI never connected"
    assert waiting.poll() is None, "wait returned while the job ran"
    gate.open()
    out, err = waiting.communicate(timeout=60)
    assert (out, err, waiting.returncode) == (b"", b"", 9)
    ended = server.cli("wait", "--json", job_id)
    assert ended.returncode == 9 and not ended.stderr
    assert json.loads(ended.stdout)["state"] == "EXITED" and json.loads(ended.stdout)["exit_code"] == 9
    killed = admin.start(["sleep", "600"])
    admin.stop(killed, force=True)
    assert server.cli("wait", killed).returncode == 128 + signal.SIGKILL
    unknown = server.cli("wait", str(uuid.uuid4()))
    assert unknown.returncode == 1 and unknown.stderr.startswith(b"NOT_FOUND: ") and not unknown.stdout


def test_cli_stream_tail_and_no_follow_of_an_ended_job(server, admin):
    job_id = admin.start(["sh", "-c", "printf 0123456789; exit 3"])
    admin.wait(job_id)
    cases = {("--tail", "4"): b"6789", ("--tail", "1K"): b"0123456789", ("--tail", "0"): b"",
             ("--no-follow",): b"0123456789", ("--tail", "2", "--no-follow"): b"89",
             ("--offset", "9", "--no-follow"): b"9"}
    for flags, out in cases.items():
        result = server.cli("stream", *flags, job_id)
        assert (result.stdout, result.stderr, result.returncode) == (out, b"", 3), flags
    both = server.cli("stream", "--tail", "1", "--offset", "1", job_id)
    assert both.returncode == 2 and len(both.stderr.splitlines()) == 1 and not both.stdout


def test_cli_stream_tail_and_no_follow_of_a_running_job(server, admin, gate):
    job_id = admin.start(py("import sys\nsys.stdout.write('0123456789'); sys.stdout.flush()\n" + gate.hold("") +
                            "print('more')\nraise SystemExit(4)"))
    wait_for_output(admin.stub, job_id, b"0123456789")
    cases = {("--no-follow",): b"0123456789", ("--tail", "4", "--no-follow"): b"6789",
             ("--offset", "10", "--no-follow"): b"", ("--offset", "99", "--no-follow"): b""}
    for flags, out in cases.items():
        result = server.cli("stream", *flags, job_id)  # returns, although the job runs on
        assert (result.stdout, result.stderr, result.returncode) == (out, b"", 0), flags
    following = subprocess.Popen(server.cli_argv("stream", "--tail", "4", job_id), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    assert read_exactly(following.stdout, 4) == b"6789"
    gate.open()
    rest, err = following.communicate(timeout=60)
    assert (rest, err, following.returncode) == (b"more\n", b"", 4)


def test_cli_and_server_say_their_version(server):
    said = subprocess.run([sys.executable, JOBWORKER, "--version"], capture_output=True, timeout=60)
    assert (said.stdout, said.returncode) == (f"jobworker {jobworker.VERSION}\n".encode(), 0)
    assert f"jobworker {jobworker.VERSION} serving on " in server.read_log()


def test_cli_errors_are_one_line_naming_the_status(server):
    cases = [
        (("start", "--", "sleep", "1"), "observer", None, "PERMISSION_DENIED: observers cannot start jobs"),
        (("query", str(uuid.uuid4())), "admin", None, "NOT_FOUND: "),
        (("query", "nonsense"), "admin", None, "INVALID_ARGUMENT: "),
        (("start", "--", "/no/such"), "admin", None, "INVALID_ARGUMENT: "),
        (("stream", "--offset", "999999", str(uuid.uuid4())), "admin", None, "NOT_FOUND: "),
        (("list",), "admin", "127.0.0.1:1", "UNAVAILABLE: "),  # no server there
    ]
    for argv, role, addr, expected in cases:
        result = server.cli(*argv, role=role, addr=addr)
        lines = result.stderr.decode().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(expected), (argv, result.stderr)
        assert b"Traceback" not in result.stderr


def test_cli_numeric_flags_refuse_what_their_field_cannot_hold(server, tmp_path):
    """Negative, non-numeric and out-of-range values (beyond what the protobuf field holds: uint64 sizes, offsets and
    pids; a finite, non-negative cpu; a timeout from 0 to 3600 s) are refused before anything is sent: one line on
    stderr, exit status 2, as for any other mistake on the command line."""
    job_id, beyond_uint64 = str(uuid.uuid4()), str(2 ** 64)
    cases = [("start", "--cpu", value, "--", "true") for value in ("-1", "nan", "inf", "1e309", "two")]
    cases += [("start", f"--{flag}", value, "--", "true") for flag in ("memory", "io-read-bps", "io-write-bps", "pids")
              for value in ("-3", "lots", beyond_uint64)]
    cases += [("start", "--memory", "99999999999T", "--", "true"), ("start", "--pids", "1.5", "--", "true")]
    cases += [("stop", "--timeout", value, job_id) for value in ("-1", "nan", "inf", "3601", "soon")]
    cases += [("stream", "--offset", value, job_id) for value in ("-1", "99999999999999999999999", "start")]
    cases += [("stream", "--tail", value, job_id) for value in ("-1", "lots", beyond_uint64)]
    cases += [("serve", "--data-dir", str(tmp_path), *limit) for limit in
              (("--default", "pids=-3"), ("--max", "memory=99999999999T"), ("--default", "cpu=nan"))]
    cases += [("serve", "--data-dir", str(tmp_path), flag, value) for flag, value in
              (("--keep-jobs", "-1"), ("--keep-jobs", "many"), ("--keep-for", "soon"), ("--keep-for", "-1d"),
               ("--keep-for", "nan"), ("--max-output", "lots"), ("--max-output", beyond_uint64),
               ("--min-free", "100%"), ("--min-free", "-5%"), ("--min-free", "some"))]
    cases += [("list", "--limit", "-1"), ("list", "--state", "HAPPY")]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # a CPU each, so that each has its own time to answer
        results = list(pool.map(lambda argv: server.cli(*argv), cases))
    wrong = [f"{shlex.join(argv)}: exit {result.returncode}, {result.stdout!r}, {result.stderr[-300:]!r}"
             for argv, result in zip(cases, results) if result.returncode != 2 or result.stdout or
             len(result.stderr.splitlines()) != 1 or not result.stderr.startswith(b"jobworker: ")]
    assert not wrong, "\n".join(wrong)


def test_every_flag_of_every_subcommand_says_what_it_is_for():
    parser = jobworker.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"{name} {action.option_strings or action.dest}" for name, subcommand in subcommands.items()
              for action in subcommand._actions if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not silent, f"without a help string: {silent}"
    for name, subcommand in subcommands.items():
        assert "--help" in subcommand.format_help(), name  # argparse formats help with %: a bare one breaks --help


def test_cli_query_and_list_describe_a_job_ended_by_a_realtime_signal(server, admin):
    number = signal.SIGRTMIN + 1  # no name in Python's signal.Signals
    job_id = admin.start(["sh", "-c", f"kill -s {number} $$"])
    assert read_stream(admin.stub, job_id).status.signal == number
    for argv in (("query", job_id), ("list", "--limit", "0")):
        result = server.cli(*argv)
        assert result.returncode == 0 and not result.stderr, (argv, result.stderr)
        assert [line for line in result.stdout.decode().splitlines() if job_id in line], (argv, result.stdout)
    assert server.cli("stream", job_id).returncode == 128 + number


def test_sizes_and_durations_read_as_people_write_them():
    sizes = {0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 5 * MiB: "5.0 MiB", 3 << 30: "3.0 GiB",
             2 ** 64 - 1: "16.0 EiB"}
    assert {size: jobworker.format_size(size) for size in sizes} == sizes
    durations = {0.04: "0.0s", 59.94: "59.9s", 60: "1m00s", 192.5: "3m12s", 2 * 3600 + 300: "2h05m",
                 3 * 86400 + 4 * 3600 + 59: "3d04h"}
    assert {seconds: jobworker.format_duration(seconds) for seconds in durations} == durations


def columns(line, header):
    """The cells of a line of list's or query's table, each where the header says its column is: a cell begins where
    its header does (ends, for a right-aligned column) and runs to two spaces; the command runs to the line's end."""
    cells = []
    for match in re.finditer(r"\S+(?: \S+)*", header):
        name, (start, end) = match.group(), match.span()
        if name == "COMMAND":
            cells.append(line[start:])
            continue
        cell = re.search(r"\S+(?: \S+)*$", line[:end]) if name in jobworker.RIGHT_ALIGNED else \
            re.match(r"\S+(?: \S+)*", line[start:])
        assert cell, f"nothing in {name}'s column: {line!r}"
        cells.append(cell.group())
    return cells


def test_cli_list_and_query_print_aligned_columns_local_times_durations_and_sizes(server, admin, pki, gate):
    """Times in the local time zone with its offset (here +05:30, from TZ), durations, sizes with units, and columns
    that stay aligned whatever the length of an owner, a result or a command (one line each, even with a newline)."""
    owner = "a-rather-long-owner-name-" * 2
    long_named = server.client(pki.leaf("long-owner", f"/O=jobworker/OU=user/CN={owner}"))
    ended = long_named.start(["head", "-c", "2048", "/dev/zero"])
    killed = admin.start(["sh", "-c", f"kill -s {signal.SIGRTMIN + 1} $$"])
    odd = admin.start(["printf", "%s", "line one\nline two", "\x1b[31m"])  # an escape sequence: red
    running = admin.start(py(gate.hold()))
    wait_for_output(admin.stub, running, b"ready\n")
    statuses = {job_id: admin.wait(job_id) for job_id in (ended, killed, odd)} | {running: admin.query(running)}
    local = dict(os.environ, TZ="IST-05:30")  # POSIX: the offset west of UTC, hence the minus
    cli = lambda *argv: subprocess.run(server.cli_argv(*argv), env=local, capture_output=True, timeout=60)
    listed = cli("list", "--limit", "0")  # every job: the session's server may have more than list's default 50
    assert listed.returncode == 0 and not listed.stderr
    header, *lines = listed.stdout.decode().splitlines()
    assert columns(header, header) == list(jobworker.COLUMNS)
    rows = {line.split()[0]: columns(line, header) for line in lines}
    assert len(rows) == len(lines) == len(admin.list()), "a job's line broke, or is missing"
    expected = {
        ended: ["EXITED", "exit 0", f"O=jobworker,OU=user,CN={owner}", "2.0 KiB", "head -c 2048 /dev/zero"],
        killed: ["EXITED", f"signal {signal.SIGRTMIN + 1} (SIGRTMIN+1)", SUBJECT["admin"], "0 B",
                 f"sh -c 'kill -s {signal.SIGRTMIN + 1} $$'"],
        odd: ["EXITED", "exit 0", SUBJECT["admin"], "22 B", "printf %s 'line one\\nline two' '\\x1b[31m'"],
        running: ["RUNNING", f"pid {statuses[running].pid}", SUBJECT["admin"], "6 B",
                  "python3 -c 'import socket\\ngate = "],
    }
    for job_id, (state, result, who, size, command) in expected.items():
        started = time.gmtime(statuses[job_id].started_at.seconds + 5 * 3600 + 30 * 60)
        assert rows[job_id][:5] == [job_id, state, result, who, time.strftime("%Y-%m-%d %H:%M:%S +0530", started)]
        assert re.fullmatch(r"\d+\.\ds|\d+m\d\ds", rows[job_id][5]), rows[job_id]
        assert rows[job_id][6] == size and rows[job_id][7].startswith(command), rows[job_id]  # the gate's: its start
    queried = cli("query", ended)
    assert queried.returncode == 0 and not queried.stderr
    query_header, row = queried.stdout.decode().splitlines()
    assert columns(row, query_header) == rows[ended]
    gate.open()


def test_cli_shows_an_owners_whole_subject_with_the_control_characters_of_its_cn_escaped(server, admin, pki):
    """A CN holding an escape sequence (clear the screen) and a newline: list and query show the owner's whole subject
    on the job's one line, those characters escaped; --json gives it exactly."""
    eve = server.client(pki.leaf("escaping-cn", "/O=jobworker/OU=user/CN=eve\x1b[2J\nOU=admin"))
    job_id = eve.start(["true"])
    eve.wait(job_id)
    subject = "O=jobworker,OU=user,CN=eve\x1b[2J\nOU\\=admin"
    assert admin.query(job_id).owner == subject
    for argv in (("query", job_id), ("list", "--limit", "0")):
        shown = server.cli(*argv)
        assert shown.returncode == 0 and b"\x1b" not in shown.stdout, argv
        header, *lines = shown.stdout.decode().splitlines()
        (row,) = [line for line in lines if line.startswith(job_id)]
        assert columns(row, header)[3] == "O=jobworker,OU=user,CN=eve\\x1b[2J\\nOU\\=admin", row
    assert json.loads(server.cli("query", "--json", job_id).stdout)["owner"] == subject


class ControlCharacters(jobworker.pb_grpc.JobWorkerServicer):
    """A stand-in for a server, over the same mutual TLS, whose every answer holds control characters (escape
    sequences that clear the screen and set the terminal's title, a CSI of C1, a newline, a carriage return)."""

    TEXT = "\x1b[2J\x1b]0;owned\x07\x9b31m\nsecond line\r"

    def status(self):
        return pb.JobStatus(job_id=self.TEXT, owner=self.TEXT, command=[self.TEXT], state=pb.EXITED, exit_code=0)

    def Start(self, request, context):
        return pb.StartResponse(job_id=self.TEXT)

    def Query(self, request, context):
        return self.status()

    def List(self, request, context):
        return pb.ListResponse(jobs=[self.status()])

    def Stop(self, request, context):
        context.abort(Code.NOT_FOUND, self.TEXT)

    def Remove(self, request, context):
        context.abort(Code.FAILED_PRECONDITION, self.TEXT)


def test_cli_escapes_the_control_characters_of_whatever_a_server_sends(pki):
    """What start, run --detach, query and list print, and the error lines of stop and remove, hold no control
    character but the newlines that end their lines, whatever the server sends (here, a stand-in that sends them)."""
    cert, key = pki.server
    stand_in = grpc.server(ThreadPoolExecutor(4))
    jobworker.pb_grpc.add_JobWorkerServicer_to_server(ControlCharacters(), stand_in)
    port = stand_in.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pathlib.Path(key).read_bytes(), pathlib.Path(cert).read_bytes())],
        root_certificates=pathlib.Path(pki.ca_cert).read_bytes(), require_client_auth=True))
    stand_in.start()
    try:
        job_id, (cert, key) = str(uuid.uuid4()), pki.roles["admin"]
        cases = {("start", "--", "true"): (1, 0), ("run", "--detach", "--", "true"): (1, 0), ("query", job_id): (2, 0),
                 ("list",): (2, 0), ("stop", job_id): (0, 1), ("remove", job_id): (0, 1)}
        for (action, *rest), lines in cases.items():
            shown = subprocess.run([sys.executable, JOBWORKER, action, "--addr", f"127.0.0.1:{port}", "--cert", cert,
                                    "--key", key, "--ca", pki.ca_cert, *rest], capture_output=True, timeout=60)
            out, err = shown.stdout.decode(), shown.stderr.decode()
            assert (len(out.splitlines()), len(err.splitlines())) == lines, (action, out, err)
            assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", out + err), (action, out, err)
            assert "\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\nsecond line\\r" in out + err, (action, out, err)
    finally:
        stand_in.stop(None)


def test_cli_connection_flags_come_from_the_environment(server):
    cert, key = server.pki.roles["observer"]
    env = dict(os.environ, JOBWORKER_ADDR=server.addr, JOBWORKER_CERT=cert, JOBWORKER_KEY=key,
               JOBWORKER_CA=server.pki.ca_cert)
    result = subprocess.run([sys.executable, JOBWORKER, "start", "--", "true"], env=env, capture_output=True,
                            timeout=60)
    assert result.stderr.decode().startswith("PERMISSION_DENIED: observers cannot start jobs")


class CuttableProxy(LoopbackProxy):
    """A TCP proxy on loopback whose connections the test can cut, to drop a client's stream mid-way."""

    def __init__(self, target):
        self.connections, self.accepted = [], threading.Semaphore(0)
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
    half = pattern(8, 65536)
    code = PATTERN_JOB.format(blocks=8, size=65536) + gate.hold("sys.stdout.flush()\n") + \
        PATTERN_JOB.format(blocks=8, size=65536)
    job_id = admin.start(py(code))
    wait_for_output(admin.stub, job_id, half)  # the job holds at the gate after the first half
    proxy = CuttableProxy(server.addr)
    cli = subprocess.Popen(server.cli_argv("stream", job_id, addr=proxy.addr), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    got = read_exactly(cli.stdout, len(half))  # the first half, live
    proxy.accepted.acquire(timeout=30)
    proxy.cut()  # the connection drops mid-stream; the job then writes the second half
    gate.open()
    rest, err = cli.communicate(timeout=120)
    proxy.close()
    assert cli.returncode == 0, err
    assert got + rest == half + half
    assert proxy.accepted.acquire(timeout=0), "the client never reconnected"


def read_exactly(pipe, size):
    data = bytearray()
    while len(data) < size:
        chunk = pipe.read1(size - len(data))
        assert chunk, "the stream ended early"
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------------------------------------------------------------
# The parts: what each piece of the server promises on its own
# ---------------------------------------------------------------------------------------------------------------------

SERVER_ONLY_MODULES = ("grpc", "google.protobuf", "threading", "logging", "concurrent.futures", "argparse", "ssl",
                       "subprocess", "uuid")


def test_the_launcher_loads_none_of_the_modules_only_the_server_needs():
    """The launcher boots as Launcher.BOOT says (a bare interpreter that loads this file as a module of its own), and
    every init is a fork of it: nothing only the server uses may be imported by loading the file."""
    boot, _, call = jobworker.Launcher.BOOT.rpartition("; ")
    assert call.startswith("m.launcher_main("), f"the launcher no longer boots as this test expects: {call}"
    loaded = subprocess.run([sys.executable, "-I", "-S", "-c", boot + "; print(m.__name__, *sorted(sys.modules))",
                             JOBWORKER], capture_output=True, text=True, check=True).stdout.split()
    assert loaded[0] == "jobworker_launcher"
    assert [name for name in loaded for module in SERVER_ONLY_MODULES
            if name == module or name.startswith(module + ".")] == []


ONE_LOG = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])
PIECES = st.lists(st.tuples(st.sampled_from([jobworker.STDOUT, jobworker.STDERR]), st.binary(min_size=1, max_size=300)),
                  max_size=12)


@ONE_LOG
@given(pieces=PIECES, splice=st.integers(1, 400), chunk=st.integers(1, 64))
@example(pieces=[(jobworker.STDOUT, b"a" * 100), (jobworker.STDERR, b"b"), (jobworker.STDOUT, b"cc"),
                 (jobworker.STDOUT, b"ddd"), (jobworker.STDERR, b"e" * 40)], splice=7, chunk=16)
@example(pieces=[], splice=1, chunk=1)
def test_a_log_reader_from_any_offset_yields_every_run_apart_and_every_byte_once(tmp_path, pieces, splice, chunk):
    """An OutputLog fed from real pipes, stdout and stderr in turn (a run of one may come in several pieces, and a
    piece in several splices), then closed: a LogReader from every offset (0, inside a run, at a boundary, at the
    end) yields the bytes from there, in chunks of at most `chunk` that never cross from one run into the next."""
    jobs_dir = os.open(tempfile.mkdtemp(dir=tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    log = jobworker.OutputLog(jobs_dir, "log")
    pipes = {source: os.pipe() for source in (jobworker.STDOUT, jobworker.STDERR)}
    try:
        for source, data in pieces:
            read, write = pipes[source]
            os.write(write, data)
            taken = 0
            while taken < len(data):
                taken += log.take_from(source, read, splice)
    finally:
        for fd in (fd for pipe in pipes.values() for fd in pipe):
            os.close(fd)
    log.close()
    written = b"".join(data for _, data in pieces)
    sources = [source for source, data in pieces for _ in data]  # each byte's
    assert log.size == len(written)
    for start in range(len(written) + 1):
        expected, offset = [], start
        while offset < len(written):  # up to `chunk` bytes, to the end of the run at most
            end = offset + 1
            while end < len(written) and end - offset < chunk and sources[end] == sources[offset]:
                end += 1
            expected.append((sources[offset], offset, written[offset:end]))
            offset = end
        got = list(jobworker.LogReader(log, start, chunk))
        assert got == expected, f"from offset {start}"
        assert b"".join(data for _, _, data in got) == written[start:]
    os.close(jobs_dir)


def test_limit_policy_applies_defaults_only_where_none_was_asked_for_and_the_controller_is_there():
    policy = jobworker.LimitPolicy({"cpu_cores": 0.5, "memory_bytes": 64 * MiB, "pids": 100, "io_read_bps": MiB},
                                   {"cpu_cores": 2.0, "memory_bytes": 256 * MiB}, available={"cpu", "memory"})
    unset = dict.fromkeys(jobworker.LIMITS, 0)
    assert policy.resolve({}) == {**unset, "cpu_cores": 0.5, "memory_bytes": 64 * MiB}  # no pids or io controller
    assert policy.resolve({"memory_bytes": 32 * MiB}) == {**unset, "cpu_cores": 0.5, "memory_bytes": 32 * MiB}
    assert policy.resolve({"cpu_cores": 2.0, "memory_bytes": 256 * MiB}) == \
        {**unset, "cpu_cores": 2.0, "memory_bytes": 256 * MiB}  # a maximum itself is allowed
    every = {"cpu", "memory", "io", "pids"}
    out_of_the_box = {**unset, "pids": 1024, "memory_bytes": jobworker.memory_total() // 4}
    assert jobworker.LimitPolicy(available=every).resolve({}) == out_of_the_box
    assert jobworker.LimitPolicy({"pids": 0, "memory_bytes": 0}, available=every).resolve({}) == unset  # turned off
    assert jobworker.LimitPolicy(maxima={"memory_bytes": 64 * MiB, "pids": 10}, available=every).resolve({}) == \
        {**unset, "pids": 10, "memory_bytes": 64 * MiB}  # no default above a maximum


def test_limit_policy_refuses_what_is_over_a_maximum_unavailable_or_unusable():
    policy = jobworker.LimitPolicy(maxima={"cpu_cores": 2.0, "memory_bytes": 256 * MiB, "pids": 50},
                                   available={"cpu", "memory", "pids"})
    refusal = lambda limits, of=policy: pytest.raises(jobworker.Refused, of.resolve, limits).value.code
    INVALID, UNAVAILABLE = "INVALID_ARGUMENT", "FAILED_PRECONDITION"
    for over in ({"cpu_cores": 2.001}, {"memory_bytes": 256 * MiB + 1}, {"pids": 51}):
        assert refusal(over) == INVALID, over
    for cores in (math.nan, math.inf, -math.inf, -1.0, -1e-9):
        assert refusal({"cpu_cores": cores}) == INVALID, cores
    for memory in (1, 4 * MiB - 1):
        assert refusal({"memory_bytes": memory}) == INVALID, memory
    assert policy.resolve({"memory_bytes": 4 * MiB})["memory_bytes"] == 4 * MiB
    disks = jobworker.LimitPolicy(available={"io"})
    for limit in ("io_read_bps", "io_write_bps"):
        assert refusal({limit: 1}, disks) == INVALID, limit  # cgroup v2 refuses it: so does every server
        assert disks.resolve({limit: 2})[limit] == 2
    for elsewhere in ({"io_read_bps": 1}, {"io_write_bps": MiB}, {"pids": 10 ** 6, "io_read_bps": 1}):
        assert refusal(elsewhere) == UNAVAILABLE, elsewhere  # however much is asked for: none can be had
    bare = jobworker.LimitPolicy(available={"cpu", "memory"})  # the maxima of this host: its CPUs and its memory
    assert refusal({"cpu_cores": os.cpu_count() + 0.5}, bare) == INVALID
    assert refusal({"memory_bytes": jobworker.memory_total() + 1}, bare) == INVALID
    assert bare.resolve({"cpu_cores": float(os.cpu_count())})["cpu_cores"] == os.cpu_count()


def pids_hierarchy():
    """Where the pids controller is, and how /proc/PID/cgroup names its tree: cgroup v1's own tree, or cgroup v2's."""
    if os.path.isdir("/sys/fs/cgroup/pids"):
        return "/sys/fs/cgroup/pids", "pids"
    with contextlib.suppress(OSError), open("/sys/fs/cgroup/cgroup.controllers") as f:
        if "pids" in f.read().split():
            return "/sys/fs/cgroup", ""
    return None, None


PIDS_TREE, PIDS_KEY = pids_hierarchy()
needs_pids_tree = pytest.mark.skipif(not ROOT or not PIDS_TREE, reason="needs root and the pids controller")


def launchers_of(server):
    """The server's launcher, the process every init is forked from, as a set (empty while none runs)."""
    return set(children_of(server.proc.pid)) & set(processes_with("launcher_main"))


def job_groups(server):
    """The names of a server's job cgroups still present (its ready inits' among them)."""
    return {os.path.basename(path) for path in cgroups_of(server.proc.pid)} - {cgroup_name(server.proc.pid)}


def assert_only_ready_inits_left(server, job_ids):
    """Once the server has made its inits again, it holds a cgroup for each ready init and no other, and a log for
    each of those and for each job that ran (`job_ids`) and no other: no failed Start left anything of its own."""
    settled = lambda: inits_ready(server) and len(job_groups(server)) == READY_INITS
    assert wait_until(settled), f"{sorted(job_groups(server))}: not the groups of {READY_INITS} ready inits"
    assert set(os.listdir(os.path.join(server.data_dir, "jobs"))) == job_groups(server) | set(job_ids)


@needs_pids_tree
def test_a_start_whose_command_cannot_be_forked_is_refused_and_leaves_nothing_and_starts_recover(pki, tmp_path):
    """The server's jobs at their process cap (pids.max of its jobworker-PID-NS group): inits are still made (a process
    moved into a cgroup is not held to its cap), but none can fork its command. Each Start says so, and leaves no
    job, init, group or log; once the cap is lifted, the next Start runs."""
    server = Server(pki, str(tmp_path))
    admin = server.client()
    assert wait_until(lambda: inits_ready(server))
    (base,) = [path for path in cgroups_of(server.proc.pid)
               if path.startswith(PIDS_TREE + "/") and os.path.basename(path) == cgroup_name(server.proc.pid)]
    cap = pathlib.Path(base, "pids.max")
    cap.write_text("0")
    try:
        for _ in range(READY_INITS + 1):  # the inits made before the cap, and one made under it
            refused = pytest.raises(grpc.RpcError, admin.stub.Start, pb.StartRequest(command=["true"]),
                                    timeout=60).value
            assert refused.code() == Code.RESOURCE_EXHAUSTED
            assert refused.details() == f"cannot start 'true': {os.strerror(errno.EAGAIN)}"
        assert admin.list() == []
    finally:
        cap.write_text("max")
    ran = run_job(admin, ["echo", "recovered"])
    assert ran.out == b"recovered\n" and ran.status.state == pb.EXITED and ran.status.exit_code == 0
    assert_only_ready_inits_left(server, [ran.status.job_id])


@needs_pids_tree
def test_an_init_pool_that_cannot_make_inits_fails_starts_clearly_and_makes_them_again_once_it_can(pki, tmp_path):
    """The launcher cannot fork (the test moves it into a pids cgroup at its cap). The inits made before still run
    jobs; once they are used, a Start says why it has none, and the pool, which waits for the next Start rather than
    trying again in a loop, makes inits again as soon as the cause is gone."""
    server = Server(pki, str(tmp_path))
    admin = server.client()
    assert wait_until(lambda: inits_ready(server))  # none is being made
    (launcher,) = launchers_of(server)
    with open(f"/proc/{launcher}/cgroup") as f:
        home = next(line.split(":", 2)[2] for line in f.read().splitlines() if line.split(":", 2)[1] == PIDS_KEY)
    cap = pathlib.Path(PIDS_TREE, f"jobworker-test-{marker()}")
    cap.mkdir()
    try:
        (cap / "cgroup.procs").write_text(str(launcher))
        (cap / "pids.max").write_text("1")  # the launcher alone
        ran = [run_job(admin, ["echo", f"job {i}"]) for i in range(READY_INITS)]
        assert [(r.out, r.status.state, r.status.exit_code) for r in ran] == \
            [(f"job {i}\n".encode(), pb.EXITED, 0) for i in range(READY_INITS)]
        for _ in range(2):
            refused = pytest.raises(grpc.RpcError, admin.stub.Start, pb.StartRequest(command=["true"]),
                                    timeout=60).value
            assert refused.code() == Code.RESOURCE_EXHAUSTED
            assert refused.details() == f"cannot start the job's init: {os.strerror(errno.EAGAIN)}"
        assert server.read_log().count("cannot prepare a job's init") <= READY_INITS + 2, \
            "the pool tried again without a Start"
        (cap / "pids.max").write_text("max")
        recovered = run_job(admin, ["echo", "recovered"])
        assert recovered.out == b"recovered\n" and recovered.status.exit_code == 0
        assert_only_ready_inits_left(server, [r.status.job_id for r in ran + [recovered]])
    finally:
        with contextlib.suppress(OSError):
            pathlib.Path(PIDS_TREE + home, "cgroup.procs").write_text(str(launcher))
        cap.rmdir()


def test_a_launcher_that_dies_is_started_again_and_every_start_still_runs(pki, tmp_path):
    server = Server(pki, str(tmp_path))
    admin = server.client()
    assert wait_until(lambda: inits_ready(server))  # none is being made: no order dies with the launcher
    (launcher,) = launchers_of(server)
    pidfd = os.pidfd_open(launcher)
    os.kill(launcher, signal.SIGKILL)
    assert select.select([pidfd], [], [], 30)[0], "the launcher outlived a SIGKILL"
    os.close(pidfd)
    for i in range(READY_INITS + 2):  # the ready inits, which outlive their launcher, then inits of a new one
        ran = run_job(admin, ["echo", f"job {i}"])
        assert ran.out == f"job {i}\n".encode() and ran.status.state == pb.EXITED and ran.status.exit_code == 0
    (restarted,) = launchers_of(server)
    assert restarted != launcher


@needs_root
def test_a_start_whose_init_does_not_answer_fails_unavailable_and_its_init_and_group_go(pki, tmp_path):
    """Every ready init stopped (SIGSTOP): a Start gives up after START_TIMEOUT with UNAVAILABLE, kills the init it
    took and removes its group; the others, resumed, run jobs again."""
    server = Server(pki, str(tmp_path))
    admin = server.client()
    assert wait_until(lambda: inits_ready(server))
    (launcher,) = launchers_of(server)
    inits = children_of(launcher)  # no job runs: every one is ready
    assert len(inits) == READY_INITS and all(proc_status(pid)["Name"] == "jobworker-init" for pid in inits)
    groups = {}
    for pid in inits:
        with open(f"/proc/{pid}/cgroup") as f:
            groups[pid] = next(line.rsplit("/", 1)[1] for line in f.read().splitlines()
                               if f"/{cgroup_name(server.proc.pid)}/" in line)
    alive = lambda pid: os.path.exists(f"/proc/{pid}") and not proc_status(pid)["State"].startswith("Z")
    for pid in inits:
        os.kill(pid, signal.SIGSTOP)
    try:
        refused = pytest.raises(grpc.RpcError, admin.stub.Start, pb.StartRequest(command=["true"]),
                                timeout=jobworker.START_TIMEOUT + 60).value
        assert refused.code() == Code.UNAVAILABLE
        assert f"did not answer within {jobworker.START_TIMEOUT:g} s" in refused.details()
        (taken,) = [pid for pid in inits if not alive(pid)]
        assert groups[taken] not in job_groups(server), "the group of the init that did not answer is still there"
        assert admin.list() == []
    finally:
        for pid in inits:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert not [pid for pid in inits if pid != taken and proc_status(pid)["State"].startswith("T")], "still stopped"
    ran = [run_job(admin, ["echo", f"job {i}"]) for i in range(READY_INITS)]
    assert [(r.out, r.status.exit_code) for r in ran] == [(f"job {i}\n".encode(), 0) for i in range(READY_INITS)]
    assert_only_ready_inits_left(server, [r.status.job_id for r in ran])


def test_a_stop_after_the_command_has_exited_on_its_own_reports_exited_with_its_code(admin, gate):
    """The command has exited (the test sees it go) before the Stop is sent, but the server may not have taken its end
    in yet: the Stop finds the job EXITED, with the command's exit code."""
    for _ in range(5):
        job_id = admin.start(py(gate.hold() + "raise SystemExit(3)"))
        wait_for_output(admin.stub, job_id, b"ready\n")
        command = os.pidfd_open(admin.query(job_id).pid)  # while the gate holds it
        gate.open()
        assert select.select([command], [], [], 60)[0], "the command did not exit"
        os.close(command)
        status = admin.stop(job_id)
        assert (status.state, status.exit_code, status.signal) == (pb.EXITED, 3, 0), status


def test_a_stop_right_after_a_start_reports_either_the_commands_own_end_or_the_stop(admin):
    """`true` may end before a Stop sent at once reaches it, or be ended by it; never both: a Stop that reports the job
    STOPPED reports the signal that ended it, not an exit code of the command's own."""
    for _ in range(20):
        status = admin.stop(admin.start(["true"]))
        if status.state == pb.EXITED:
            assert (status.exit_code, status.signal) == (0, 0), status
        else:
            assert status.state == pb.STOPPED, status
            assert not status.HasField("exit_code") and status.signal == signal.SIGTERM, \
                f"STOPPED, yet the command exited on its own (exit code {status.exit_code})"


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
    isolation = run_job(admin, ["true"], memory_bytes=64 << 20, cpu_cores=0.5, pids=100).status.isolation
    assert isolation.mode == "auto" and isolation.cgroup in ("v1", "v2")
    assert set(isolation.namespaces) == {"pid", "mount", "network", "ipc", "cgroup"}
    assert isolation.limits.memory_bytes == 64 << 20 and isolation.limits.cpu_cores == 0.5
    assert isolation.limits.pids == 100 and re.fullmatch(r"uid \d+ \(transient\)", isolation.user)


def first_line(stub, job_id):
    """The first line a running job writes (it has got that far)."""
    call, got = stub.Stream(pb.StreamRequest(job_id=job_id), timeout=120), bytearray()
    try:
        for message in call:
            got += message.data
            if b"\n" in got:
                return got[:got.index(b"\n")].decode()
    finally:
        call.cancel()
    raise AssertionError(f"the job ended without a whole line: {bytes(got)!r}")


ADD_KEY = {"x86_64": 248, "aarch64": 217}[os.uname().machine]
KEYCTL, KEYCTL_READ, KEY_SPEC_SESSION_KEYRING = jobworker.SYSCALLS[os.uname().machine]["keyctl"], 11, -3


@needs_root
def test_two_users_jobs_cannot_reach_each_others_files_sockets_ipc_or_keys(server, gate):
    """What the red team's job left for another user's (0600 files in /tmp, /var/tmp and /dev/shm, a Unix socket in
    /tmp, SysV shared memory, a key in its session keyring), the other job cannot see, connect to, or read: each job
    has its own /tmp, /var/tmp and /dev/shm, IPC namespace and session keyring. (A symbolic link planted in /tmp
    cannot catch a later write of another job's for the same reason.)"""
    alice, bob = server.client("user"), server.client("user2")
    leaves = py("import ctypes, os, socket, subprocess\n"
                "for directory in ('/tmp', '/var/tmp', '/dev/shm'):\n"
                "    fd = os.open(directory + '/secret', os.O_CREAT | os.O_WRONLY, 0o600)\n"
                "    os.write(fd, b'alice')\n"
                "listener = socket.socket(socket.AF_UNIX)\nlistener.bind('/tmp/socket')\nlistener.listen()\n"
                "shm = subprocess.run(['ipcmk', '-M', '4096'], capture_output=True, text=True, check=True).stdout\n"
                "libc = ctypes.CDLL(None, use_errno=True)\n"
                f"key = libc.syscall({ADD_KEY}, b'user', b'jobworker-test', b'alice', 5, {KEY_SPEC_SESSION_KEYRING})\n"
                "print(shm.split()[-1], key, flush=True)\n" + gate.hold(""))
    left = alice.start(leaves)
    shm_id, key = first_line(alice.stub, left).split()
    assert int(key) > 0, "the job could not add a key to its session keyring"
    looks = py("import ctypes, json, socket, subprocess, os\n"
               "seen = {d: os.listdir(d) for d in ('/tmp', '/var/tmp', '/dev/shm')}\n"
               "seen['ipcs'] = subprocess.run(['ipcs', '-m'], capture_output=True, text=True).stdout\n"
               "try:\n    socket.socket(socket.AF_UNIX).connect('/tmp/socket')\n    seen['socket'] = 'connected'\n"
               "except OSError as e:\n    seen['socket'] = e.strerror\n"
               "libc = ctypes.CDLL(None, use_errno=True)\nkey = ctypes.create_string_buffer(64)\n"
               f"seen['key'] = libc.syscall({KEYCTL}, {KEYCTL_READ}, {key}, key, 64)\n"
               "print(json.dumps(seen))\n")
    ran = run_job(bob, looks)
    assert ran.status.exit_code == 0, ran.err
    seen = json.loads(ran.out)
    assert (seen["/tmp"], seen["/var/tmp"], seen["/dev/shm"]) == ([], [], []), seen
    assert not [line for line in seen["ipcs"].splitlines() if line.startswith("0x")], seen["ipcs"]
    assert seen["socket"] == "No such file or directory" and seen["key"] == -1, seen
    gate.open()
    assert read_stream(alice.stub, left).status.exit_code == 0


def host_processes_of(uid):
    """Host pids of the live processes whose real uid is `uid` (not a zombie, which its parent has yet to reap)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, KeyError):
            status = proc_status(pid)
            if int(status["Uid"].split()[0]) == uid and not status["State"].startswith("Z"):
                found.append(int(pid))
    return found


@needs_root
def test_each_job_runs_as_a_transient_user_of_its_own_which_is_given_back_once_its_processes_are_gone(pki, tmp_path,
                                                                                                      gate):
    """Two jobs at once have two uids (and gids) of the range no host account has; a third Start finds none left and
    is refused; once a job's processes are gone its uid is free again, and the next job gets it. A range that holds
    a host account's id is refused at start."""
    first = jobworker.TRANSIENT_IDS[0] + 1000
    server = Server(pki, str(tmp_path / "server"), "--uid-range", f"{first}-{first + 1}")
    admin = server.client()
    ids = py("import os\nprint(*os.getresuid(), *os.getresgid(), os.getgroups(), flush=True)\n" + gate.hold(""))
    held = [admin.start(ids) for _ in range(2)]
    seen = sorted(first_line(admin.stub, job_id) for job_id in held)
    assert seen == [f"{uid} {uid} {uid} {uid} {uid} {uid} []" for uid in (first, first + 1)]
    assert sorted(admin.query(job_id).isolation.user for job_id in held) == \
        [f"uid {first} (transient)", f"uid {first + 1} (transient)"]
    assert all(host_processes_of(uid) for uid in (first, first + 1))
    refused = status_of(lambda: admin.start(["true"]))
    assert refused.code == Code.RESOURCE_EXHAUSTED
    gate.open()
    gate.open()
    for job_id in held:
        assert admin.wait(job_id).exit_code == 0
    assert host_processes_of(first) == host_processes_of(first + 1) == []
    assert run_job(admin, py("import os\nprint(os.getuid())")).out == f"{first}\n".encode()  # the next round
    server.stop()
    with pytest.raises(RuntimeError) as refusal:
        Server(pki, str(tmp_path / "clash"), "--uid-range", "65000-65600")
    assert "--uid-range 65000-65600 holds ids the host uses" in str(refusal.value)


@needs_root
def test_the_host_file_system_is_read_only_to_a_transient_user_but_its_home_and_tmp_are_its_own(admin):
    """Nowhere on the host a job may write, not even a directory anyone may write in: every mount it has is
    read-only and nosuid but its own /tmp, /var/tmp, /dev/shm (tmpfs, each as big as its memory limit, and what is
    kept there is the job's memory) and /proc. It starts in its home, the private /tmp."""
    open_to_all = tempfile.mkdtemp(prefix="jobworker-open-", dir=SHARED)
    os.chmod(open_to_all, 0o777)
    try:
        writes = py("import json, os\nresult = {'cwd': os.getcwd()}\n"
                    f"for path in ({open_to_all!r} + '/x', os.path.expanduser('~/x'), 'x', '/var/tmp/x', "
                    "'/dev/shm/x'):\n"
                    "    try:\n        open(path, 'w').close()\n        result[path] = 'written'\n"
                    "    except OSError as e:\n        result[path] = e.strerror\n"
                    "tmp = os.statvfs('/tmp')\nresult['tmp size'] = tmp.f_blocks * tmp.f_frsize\n"
                    "with open('/dev/shm/big', 'wb') as f:\n    f.write(bytes(32 << 20))\n"
                    "mounts = [line.split() for line in open('/proc/self/mountinfo')]\n"
                    "result['suid'] = [m[4] for m in mounts if 'nosuid' not in m[5].split(',')]\n"
                    "result['writable'] = sorted(m[4] for m in mounts if 'rw' in m[5].split(','))\n"
                    "print(json.dumps(result))\n")
        ran = run_job(admin, writes, memory_bytes=64 * MiB)
        assert ran.status.exit_code == 0, ran.err
        result = json.loads(ran.out)
        assert result == {"cwd": "/tmp", f"{open_to_all}/x": "Read-only file system", "/tmp/x": "written",
                          "x": "written", "/var/tmp/x": "written", "/dev/shm/x": "written", "tmp size": 64 * MiB,
                          "suid": [], "writable": ["/dev/shm", "/proc", "/tmp", "/var/tmp"]}, result
        assert ran.status.usage.peak_memory_bytes >= 32 * MiB, "what a job keeps in /dev/shm is not its memory"
        assert os.listdir(open_to_all) == []
    finally:
        shutil.rmtree(open_to_all)


@needs_root
def test_a_job_has_no_way_to_more_privilege_no_capability_no_setuid_no_user_namespace(admin):
    """The red team's job got every capability in a user namespace of its own (unshare -Urm). Now: an empty bounding
    set (no exec can give it a capability), no_new_privs (no setuid bit or file capability counts), and a seccomp
    filter by which no user namespace can be made."""
    ran = run_job(admin, ["sh", "-c", "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
                                      "unshare -Urm id -u; echo unshare $?"])
    assert ran.out.split(b"\n")[:4] == [b"CapBnd:\t0000000000000000", b"NoNewPrivs:\t1", b"Seccomp:\t2",
                                        b"unshare 1"], ran
    assert b"Operation not permitted" in ran.err


@needs_root
def test_a_job_sees_only_its_own_cgroup_not_other_jobs_or_the_ready_inits(admin, gate):
    """In its cgroup namespace, with the cgroup file systems mounted again, a job's cgroup is the root of every tree
    it sees: no other job's id, no ready init's, no directory of the server's."""
    other = admin.start(py(gate.hold()))
    wait_for_output(admin.stub, other, b"ready\n")
    looks = py("import json, os\n"
               "names = [name for _, dirs, _ in os.walk('/sys/fs/cgroup') for name in dirs]\n"
               "print(json.dumps({'cgroup': open('/proc/self/cgroup').read().splitlines(), 'names': names}))")
    job_id = admin.start(looks)
    ran = read_stream(admin.stub, job_id)
    seen = json.loads(ran.out)
    assert seen["cgroup"] and all(line.endswith(":/") for line in seen["cgroup"]), seen["cgroup"]
    ids = [name for name in seen["names"] if re.fullmatch(r"[0-9a-f-]{36}|jobworker-.*", name)]
    assert ids == [], "a job can see other groups of the server's"
    gate.open()
    assert read_stream(admin.stub, other).status.exit_code == 0


@needs_root
def test_a_process_elsewhere_holding_a_jobs_output_pipe_cannot_keep_it_running_or_write_into_its_output(admin,
                                                                                                        gate):
    """A job is over when its command has ended and its processes are gone: a process outside the job that holds its
    stdout (here the test, as root, by /proc) neither keeps it RUNNING, nor holds up a Stop past its kill, nor gets
    what it writes into the output."""
    label = marker()
    job_id = admin.start(py(f"# {label}\n" + gate.hold()))
    wait_for_output(admin.stub, job_id, b"ready\n")
    (pid,) = processes_with(label)
    with open(f"/proc/{pid}/fd/1", "wb", buffering=0) as held:
        gate.open()
        assert admin.wait(job_id).state == pb.EXITED
        with contextlib.suppress(BrokenPipeError):
            held.write(b"injected\n")
        assert read_stream(admin.stub, job_id).out == b"ready\n"
    deaf = admin.start(["sh", "-c", f"trap '' TERM; echo ready; sleep {label}"])
    wait_for_output(admin.stub, deaf, b"ready\n")
    (pid,) = wait_until(lambda: processes_with(f"sleep\0{label}"))  # its stdout is the job's, as the shell's is
    with open(f"/proc/{pid}/fd/1", "wb", buffering=0):
        stopped = admin.stop(deaf, timeout=0.5)  # returns once the kill has ended it, the pipe still held
        assert stopped.state == pb.STOPPED and stopped.signal == signal.SIGKILL


@needs_root
def test_a_job_that_asks_for_no_limit_runs_with_the_servers_default_processes_and_memory(server, admin, gate):
    """Out of the box: 1024 processes and a quarter of the host's memory, in the status and in the job's cgroups."""
    job_id = admin.start(py(gate.hold()))
    wait_for_output(admin.stub, job_id, b"ready\n")
    limits = admin.query(job_id).isolation.limits
    assert (limits.pids, limits.memory_bytes, limits.cpu_cores) == (1024, HOST_MEMORY // 4, 0)
    applied = {}
    for group in (path for path in cgroups_of(server.proc.pid) if os.path.basename(path) == job_id):
        for name in ("pids.max", "memory.max", "memory.limit_in_bytes"):
            with contextlib.suppress(FileNotFoundError):
                applied[name.split(".")[0]] = pathlib.Path(group, name).read_text().strip()
    page = os.sysconf("SC_PAGE_SIZE")
    assert applied == {"pids": "1025", "memory": str(HOST_MEMORY // 4 // page * page)}  # pids: the init's one more
    gate.open()
    assert admin.wait(job_id).exit_code == 0


@needs_root
def test_a_job_over_its_memory_limit_is_killed_and_reported_as_such(admin):
    ran = run_job(admin, py("data = bytearray(256 << 20)\nprint('survived')"), memory_bytes=32 << 20)
    assert ran.status.state == pb.OOM_KILLED and ran.status.signal == signal.SIGKILL and ran.status.usage.oom_killed
    assert b"survived" not in ran.out
    assert ran.status.usage.peak_memory_bytes <= 33 << 20


@needs_root
def test_a_cpu_capped_busy_loop_uses_no_more_than_its_quota(admin):
    ran = run_job(admin, py("import time\nend = time.time() + 2\nwhile time.time() < end: pass"), cpu_cores=0.25)
    used, wall = ran.status.usage.cpu_seconds, wall_seconds(ran.status)
    assert ran.status.exit_code == 0, ran.err
    assert used <= 0.25 * wall * 1.2 + 0.05, (used, wall)
    assert used >= 0.25 * wall * 0.5, "the loop did not run"


@needs_root
def test_a_job_at_its_process_limit_cannot_fork_more(admin):
    code = ("import os, sys, time\nchildren = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        print('refused', e.errno); break\n    if pid == 0:\n"
            "        time.sleep(60); os._exit(0)\n    children += 1\nprint('children', children)")
    ran = run_job(admin, py(code), pids=5)
    assert b"refused 11" in ran.out and b"children 4" in ran.out, ran  # 5 processes: python and 4 children


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
    lines = run_job(admin, py(code % server.port)).out.decode().splitlines()
    assert lines[0] == "[1, 2]", lines  # the init and the command, nothing of the host's
    assert lines[1] == "['lo']"
    assert lines[2] == "loopback up"
    assert lines[3].startswith("host unreachable"), "a job reached a listener on the host's loopback"
    assert lines[4] == "no route 101"


@needs_root
def test_a_mount_inside_a_job_does_not_reach_the_host(root_server):
    target = tempfile.mkdtemp(prefix="jobworker-mount-", dir=SHARED)  # not in /tmp, which the job has of its own
    try:
        ran = run_job(root_server.client(), ["sh", "-c", f"mount -t tmpfs tmp {target} && grep -c {target} "
                                                          "/proc/mounts"])
        assert ran.status.exit_code == 0 and ran.out == b"1\n", ran.err
        with open("/proc/self/mountinfo") as f:
            assert target not in f.read()
    finally:
        os.rmdir(target)


@needs_root
def test_a_double_forked_daemon_is_gone_after_stop(admin):
    job_id, label = start_with_a_daemon(admin)
    assert len(processes_with(label)) >= 2  # the daemon, the foreground sleep (and the shell naming them)
    admin.stop(job_id, timeout=5)
    assert processes_with(label) == []


@needs_root
def test_zombies_are_reaped_and_the_exit_status_is_the_commands_own(admin):
    code = ("import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    if os.fork() == 0:\n"
            "        os.close(r); os._exit(0)\n    os._exit(0)\nos.close(w); os.read(r, 1); os.wait()\n"
            "def states():\n    for p in filter(str.isdigit, os.listdir('/proc')):\n        try:\n"
            "            yield open(f'/proc/{p}/stat').read().split()[2]\n        except OSError:\n            pass\n"
            "deadline = time.time() + 10\nwhile time.time() < deadline and 'Z' in states():\n    time.sleep(0.01)\n"
            "print('zombies', list(states()).count('Z'))\nraise SystemExit(42)")
    ran = run_job(admin, py(code))
    assert ran.out == b"zombies 0\n", ran.err
    assert ran.status.exit_code == 42


@needs_root
def test_an_unprivileged_job_cannot_write_where_its_user_cannot(admin):
    target = f"/root/jobworker-test-{marker()}"
    ran = run_job(admin, ["sh", "-c", f"id -u; id -G; echo x > {target}"])
    uid, gids = ran.out.decode().split("\n")[:2]
    assert int(uid) in range(jobworker.TRANSIENT_IDS[0], jobworker.TRANSIENT_IDS[1] + 1) and gids == uid
    assert ran.status.exit_code != 0 and b"Permission denied" in ran.err
    assert not os.path.exists(target)


@needs_root
def test_jobs_die_with_a_server_killed_outright_and_the_next_server_removes_their_groups(pki, tmp_path):
    """A new server removes the cgroup directories of a server that is gone, and only of one in its PID namespace:
    there, the same pid may be a live server."""
    server = Server(pki, str(tmp_path))
    admin = server.client()
    label = marker()
    job_id = admin.start(["sh", "-c", f"sleep {label} & echo ready; wait"])
    wait_for_output(admin.stub, job_id, b"ready\n")
    pidfds = [os.pidfd_open(pid) for pid in processes_with(label)]
    assert pidfds
    server.stop(signal.SIGKILL)
    for pidfd in pidfds:
        assert select.select([pidfd], [], [], 30)[0], "a job outlived its server"
        os.close(pidfd)
    left = cgroups_of(server.proc.pid)
    assert left, "nothing to clean up: the test proves nothing"
    elsewhere = [os.path.join(os.path.dirname(path), f"jobworker-{server.proc.pid}-{PID_NAMESPACE + 1}")
                 for path in left if os.path.basename(path) == cgroup_name(server.proc.pid)]
    for path in elsewhere:  # as a server of that pid in another PID namespace would name its own
        os.mkdir(path)
    try:
        Server(pki, str(tmp_path / "again"))
        assert not cgroups_of(server.proc.pid)
        assert all(os.path.isdir(path) for path in elsewhere), "a server removed another PID namespace's cgroup"
    finally:
        for path in elsewhere:
            os.rmdir(path)


@needs_root
@pytest.mark.skipif(not os.path.exists("/sys/fs/cgroup/unified/cgroup.procs") and
                    not os.path.exists("/sys/fs/cgroup/cgroup.procs"), reason="no cgroup2 hierarchy")
def test_cgroup_v2_path_places_kills_and_removes_job_groups(pki, tmp_path):
    server = Server(pki, str(tmp_path), "--cgroup", "v2")
    admin = server.client()
    job_id, label = start_with_a_daemon(admin)
    assert admin.query(job_id).isolation.cgroup == "v2"
    groups = set()
    for pid in processes_with(label):
        with open(f"/proc/{pid}/cgroup") as f:
            groups.add(f.read().split("0::", 1)[1].split()[0])
    assert len(groups) == 1
    (cgroup,) = groups
    assert f"/{cgroup_name(server.proc.pid)}/" in cgroup
    group = next(path for path in cgroups_of(server.proc.pid) if path.endswith(cgroup))
    admin.stop(job_id, force=True)
    assert processes_with(label) == []
    assert not os.path.exists(group)


@needs_root
def test_a_job_reports_the_peak_memory_it_used(admin):
    """memory.peak on cgroup v2, max_usage_in_bytes on v1: a job that touches 64 MiB reports at least that."""
    ran = run_job(admin, py("data = b'x' * (64 << 20)\nprint(len(data))"))
    assert ran.out == b"67108864\n" and ran.status.exit_code == 0, ran.err
    assert 64 * MiB <= ran.status.usage.peak_memory_bytes < 112 * MiB, ran.status.usage


@needs_root
def test_an_oom_kill_takes_the_whole_job_on_cgroup_v2(admin):
    """memory.oom.group: the kernel kills every process of a job over its memory limit, not only the one that asked
    for the memory; a shell that would report its child's death never gets to."""
    label = marker()
    ran = run_job(admin, ["sh", "-c", f"sleep {label} & python3 -c 'data = b\"x\" * (256 << 20)'; echo survived $?"],
                  memory_bytes=32 * MiB)
    if ran.status.isolation.cgroup != "v2":
        pytest.skip("memory.oom.group is cgroup v2's")
    assert ran.status.state == pb.OOM_KILLED and ran.status.signal == signal.SIGKILL, ran
    assert b"survived" not in ran.out and ran.status.usage.oom_killed
    assert processes_with(label) == []


@needs_root
def test_disk_limits_hold_a_jobs_direct_reads_and_writes_on_the_data_directorys_disk(pki, disk_directory):
    """io.max on cgroup v2 (blkio's throttle on v1), on the disk of the server's data directory: 8 MiB written and
    read back with O_DIRECT at 2 MiB/s take at least 2.5 s each, and at least twice as long as without a limit. The
    jobs run as nobody (--run-as), whose host file system is writable where nobody may write (a transient user's is
    read-only)."""
    server = Server(pki, os.path.join(disk_directory, "server"), "--run-as", "nobody")
    admin = server.client()
    target = os.path.join(disk_directory, "written")
    write = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=8", "oflag=direct", "status=none"]
    read = ["dd", f"if={target}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"]
    times = {}
    for name, command, limit in (("write", write, "io_write_bps"), ("read", read, "io_read_bps")):
        for limited in (False, True):
            ran = run_job(admin, command, **({limit: 2 * MiB} if limited else {}))
            assert ran.status.exit_code == 0, ran.err
            assert getattr(ran.status.isolation.limits, limit) == (2 * MiB if limited else 0)
            times[name, limited] = wall_seconds(ran.status)
    for name in ("write", "read"):
        assert times[name, True] >= 2.5 and times[name, True] >= 2 * times[name, False], times


@needs_root
def test_a_data_directory_on_tmpfs_isolates_jobs_and_refuses_disk_limits_saying_why(pki):
    """/dev/shm is a tmpfs: what a job writes there is memory, which its memory limit covers. Isolation is on, with
    every other limit; a disk limit is refused, and the refusal says why."""
    directory = tempfile.mkdtemp(prefix="jobworker-tmpfs-", dir="/dev/shm")
    try:
        server = Server(pki, directory, "--isolation", "on")
        admin = server.client()
        limits = {"cpu_cores": 0.5, "memory_bytes": 64 * MiB, "pids": 16}
        ran = run_job(admin, ["true"], **limits)
        assert ran.status.exit_code == 0 and ran.status.isolation.mode == "on"
        assert {name: getattr(ran.status.isolation.limits, name) for name in limits} == limits
        for limit in ("io_read_bps", "io_write_bps"):
            refused = pytest.raises(grpc.RpcError, admin.start, ["true"], **{limit: MiB}).value
            assert refused.code() == Code.FAILED_PRECONDITION
            assert refused.details() == (f"{limit} limits are not available on this server: the data directory is "
                                         "on tmpfs, whose writes are memory (memory limits cover them): there is no "
                                         "disk to limit")
        server.stop()
    finally:
        shutil.rmtree(directory)


def cgroup2_root():
    """Where this host mounts cgroup v2 (with or without controllers), or None."""
    for path in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(path, "cgroup.procs")) and os.path.exists(os.path.join(path, "cgroup.threads")):
            return path
    return None


@needs_root
@pytest.mark.skipif(not cgroup2_root(), reason="no cgroup2 hierarchy")
@pytest.mark.skipif(jobworker.on_systemd(), reason="on systemd the server asks for a scope (test_hosts.py)")
def test_a_server_in_a_cgroup_it_shares_writes_nothing_there_and_says_in_one_line_how_to_fix_it(pki, tmp_path):
    """A server started in a cgroup that holds another process too (as a login shell's is) cannot hand controllers
    down (cgroup v2's "no internal processes"), and the cgroup is not its own. It leaves it alone: one line says what
    is missing and how to fix it, jobs run without a cgroup (their status says so), a Start that asks for a limit
    is refused with the reason, and --isolation on refuses to start with that line."""
    shared = os.path.join(cgroup2_root(), f"jobworker-test-session-{marker()}")
    os.mkdir(shared)
    shell = subprocess.Popen(["sleep", "600"])
    try:
        pathlib.Path(shared, "cgroup.procs").write_text(str(shell.pid))
        into_it = ("sh", "-c", f'echo $$ > {shared}/cgroup.procs && exec "$@"', "sh")
        server = Server(pki, str(tmp_path / "auto"), "--cgroup", "v2", prefix=into_it)
        problem = (f"its cgroup /{os.path.basename(shared)} holds 1 other process(es), so it cannot give jobs "
                   "controllers of their own")
        warnings = [line for line in server.read_log().splitlines() if " WARNING isolation: " in line]
        assert len(warnings) == 1 and problem in warnings[0] and "(to fix: start it alone in a cgroup: " in \
            warnings[0], server.read_log()
        assert not [entry for entry in os.scandir(shared) if entry.is_dir()], "the server wrote in a cgroup not its own"
        admin = server.client()
        status = run_job(admin, ["true"]).status
        assert status.exit_code == 0 and status.isolation.cgroup == "" and status.isolation.limits == pb.Limits()
        assert set(status.isolation.namespaces) == {"pid", "mount", "network", "ipc", "cgroup"}
        refused = pytest.raises(grpc.RpcError, admin.start, ["true"], memory_bytes=64 * MiB).value
        assert refused.code() == Code.FAILED_PRECONDITION
        assert refused.details() == f"memory_bytes limits are not available on this server: {problem}"
        assert server.stop() == 0
        with pytest.raises(RuntimeError) as refusal:
            Server(pki, str(tmp_path / "on"), "--cgroup", "v2", "--isolation", "on", prefix=into_it)
        assert f"jobworker: --isolation on, but {problem}" in str(refusal.value)
    finally:
        shell.kill()
        shell.wait()
        wait_until(lambda: not pathlib.Path(shared, "cgroup.procs").read_text().split(), timeout=30)
        os.rmdir(shared)


@needs_root
def test_a_job_whose_init_does_not_act_on_a_kill_is_killed_with_its_whole_cgroup(admin, server):
    """A stopped init takes no order: a forced Stop kills it, and the job's cgroup (cgroup.kill on v2), after
    KILL_GRACE; everything of the job ends, and its group goes."""
    label = marker()
    job_id = admin.start(["sh", "-c", f"sleep {label} & echo ready; wait"])
    wait_for_output(admin.stub, job_id, b"ready\n")
    init = int(proc_status(admin.query(job_id).pid)["PPid"])
    assert proc_status(init)["Name"] == "jobworker-init"
    groups = {os.path.basename(path) for path in cgroups_of(server.proc.pid)}
    assert job_id in groups
    os.kill(init, signal.SIGSTOP)
    asked = time.monotonic()
    status = admin.stub.Stop(pb.StopRequest(job_id=job_id, force=True), timeout=60)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL, status
    assert time.monotonic() - asked >= jobworker.KILL_GRACE, "the stopped init carried out the kill"
    assert processes_with(label) == []
    assert wait_until(lambda: not os.path.exists(f"/proc/{init}")), "the init was not reaped"  # by the launcher
    assert wait_until(lambda: job_id not in {os.path.basename(path) for path in cgroups_of(server.proc.pid)}), \
        "the job's cgroup is still there"
    assert f"cgroup kill of job {job_id}" not in server.read_log()


# A server started with an ambient capability, which no job may keep (where util-linux's setpriv can start one).
AMBIENT_CAPABILITY = (("setpriv", "--inh-caps", "+net_raw", "--ambient-caps", "+net_raw") if shutil.which("setpriv")
                      else ())


@pytest.fixture(scope="module")
def plain_server(pki, tmp_path_factory):
    """A root server with isolation off, started with an ambient capability."""
    if not ROOT:
        pytest.skip("needs root")
    server = Server(pki, str(tmp_path_factory.mktemp("plain-server")), "--isolation", "off", prefix=AMBIENT_CAPABILITY)
    yield server
    assert server.stop() == 0, server.read_log()


@needs_root
def test_isolation_off_runs_jobs_plainly_and_says_so(plain_server):
    admin = plain_server.client()
    ran = run_job(admin, py("import os\nprint(os.getppid() > 1, len(os.listdir('/proc')) > 10)"))
    assert ran.out == b"True True\n"
    assert ran.status.isolation.mode == "off" and not ran.status.isolation.namespaces
    assert not ran.status.isolation.cgroup
    assert status_of(lambda: admin.start(["true"], memory_bytes=64 << 20)).code == Code.FAILED_PRECONDITION
    job_id, label = start_with_a_daemon(admin)
    admin.stop(job_id, timeout=5)
    assert processes_with(label) == [], "without namespaces the init still takes the job's orphans"


@needs_root
def test_isolation_off_every_job_has_an_init_of_its_own_and_its_users_rights_only(plain_server, gate):
    """Without namespaces or a cgroup, each job still gets an init of its own, which ends with it; the job is nobody,
    with no group, no capability, no way back to root and no way into its init."""
    admin = plain_server.client()
    nobody = pwd.getpwnam("nobody")
    who = py("import os\n"
             "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapInh', 'CapPrm', "
             "'CapEff', 'CapAmb'))]\n"
             "try:\n    os.setresuid(0, 0, 0)\n    root = 'root again'\n"
             "except PermissionError:\n    root = 'no root'\n"
             "try:\n    open(f'/proc/{os.getppid()}/environ').read()\n    init = 'init open'\n"
             "except PermissionError:\n    init = 'init closed'\n"
             "print(*os.getresuid(), *os.getresgid(), os.getgroups(), *caps, root, init, flush=True)\n" + gate.hold(""))
    expected = (f"{nobody.pw_uid} " * 3 + f"{nobody.pw_gid} " * 3 + "[] " + "0000000000000000 " * 4 +
                "no root init closed\n").encode()
    inits = []
    for _ in range(2):
        label = marker()
        job_id = admin.start(["sh", "-c", f"setsid sleep {label} & exec {shlex.join(who)}"])
        wait_for_output(admin.stub, job_id, expected)  # it has said who it is, and waits at the gate
        inits.append(int(proc_status(admin.query(job_id).pid)["PPid"]))
        init = os.pidfd_open(inits[-1])
        gate.open()
        ran = read_stream(admin.stub, job_id)
        assert ran.out == expected and ran.status.state == pb.EXITED and ran.status.exit_code == 0
        assert processes_with(label) == [], "what a job left running ends with it"
        assert select.select([init], [], [], 30)[0], "the job's init outlived it"
        os.close(init)
    assert inits[0] != inits[1], "one init ran two jobs"


@needs_root
def test_isolation_off_a_job_that_kills_or_stops_its_init_still_ends_and_leaves_nothing(plain_server, gate):
    """Jobs and their inits share a user: a job can kill its init, or stop it."""
    admin = plain_server.client()
    # Killed: the job ends as killed once its init has gone, and what it left running comes to the launcher (a child
    # subreaper), which kills it.
    label = marker()
    job_id = admin.start(py(gate.hold("") + "import os, subprocess\n"
                            f"subprocess.Popen(['setsid', 'sleep', '{label}'])\nos.kill(os.getppid(), 9)\n"))
    gate.open()  # once its Start has returned
    status = read_stream(admin.stub, job_id).status
    assert status.state == pb.EXITED and status.signal == signal.SIGKILL
    assert wait_until(lambda: processes_with(label) == []), "what the job left running outlived it"
    # Stopped: a Stop still ends the job, by killing the init when it does not act.
    job_id = admin.start(py(gate.hold("") + "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n"
                            "print('stopped', flush=True)\n" f"os.execvp('sleep', ['sleep', '{label}'])\n"))
    gate.open()
    wait_for_output(admin.stub, job_id, b"stopped\n")
    status = admin.stub.Stop(pb.StopRequest(job_id=job_id, force=True), timeout=60)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    assert wait_until(lambda: processes_with(label) == [])  # the launcher kills the orphan once it reaps the init


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
# - the server's threads never exceed its RPC pool (RPC_POOL threads, which stay once made) and OWN_THREADS of its
#   own, and a scenario run again adds none, but for the two pools that size themselves to the most calls at once
#   (gRPC's own, which may keep up to GRPC_POOL_SLACK threads more, and the RPC pool, RPC_POOL_SLACK more);
# - after a scenario its descriptors are back to their idle level, exactly (polled for up to SETTLE_SECONDS);
# - its resident memory is back within IDLE_MEMORY_SLACK of idle after a scenario with up to 200 calls at once, and
#   within BURST_MEMORY_SLACK after one with a caller's every stream (480) (the allocator keeps some freed memory for
#   reuse: it plateaus after a round or two and does not grow with the number of rounds), plus POOL_THREAD_MEMORY
#   for each RPC thread the pool keeps once made; a repeated round adds no
#   more than REPEAT_MEMORY_SLACK (a leak of tens of kilobytes per job or per stream would show there);
# - fan-out: 50 clients reading 100 MB each (5 GB sent) raise the server's peak memory by no more than
#   FAN_OUT_MEMORY_BOUND, and by no more than FAN_OUT_SIZE_SLACK above 50 clients reading 10 MB each;
# - a request over jobworker.MAX_REQUEST_BYTES (4 MiB) is refused with RESOURCE_EXHAUSTED and raises the server's
#   peak memory by less than OVERSIZE_MEMORY_SLACK, however large it is.

RPC_POOL = 1024     # the server's threads for calls
OWN_THREADS = 32    # its others: the main thread, the output pump, gRPC's poller and gRPC's own pool
IDLE_MEMORY_SLACK = 64 * MiB
BURST_MEMORY_SLACK = 128 * MiB
REPEAT_MEMORY_SLACK = 24 * MiB
FAN_OUT_MEMORY_BOUND = 160 * MiB
FAN_OUT_SIZE_SLACK = 32 * MiB
OVERSIZE_MEMORY_SLACK = 8 * MiB
POOL_THREAD_MEMORY = 512 * 1024  # what an RPC thread the pool keeps holds on to (its stack as touched, malloc's cache)
SETTLE_SECONDS = 120  # a vanished peer is found out by keepalive (70 s)
GRPC_POOL = "event_engine"  # the threads of gRPC's own pool, which sizes itself: after a load it lets an idle thread
GRPC_POOL_SLACK = 4         # go after 20 s, but not always within SETTLE_SECONDS
RPC_POOL_NAME = "rpc"       # the RPC pool makes a thread when a call finds none idle, so it keeps as many as the most
RPC_POOL_SLACK = 8          # calls ever at once: a round again may meet a few more at once (a Start's thread not yet
                            # back when the next Stream comes), but a call left behind per job would show as hundreds


class Figures(collections.namedtuple("Figures", "threads fds rss hwm names", defaults=[()])):
    """A process's threads, open descriptors, resident memory and peak resident memory (bytes), from /proc; and the
    names of its threads (for the message when some are left behind)."""


def figures_of(pid, names=True):
    """Figures of a process; without its threads' names if not asked (PeakWatch samples every few milliseconds)."""
    status = proc_status(pid)
    kib = lambda key: int(status[key].split()[0]) * 1024
    tasks = os.listdir(f"/proc/{pid}/task")
    thread_names = []
    for task in tasks if names else ():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/comm") as f:
            thread_names.append(f.read().strip())
    return Figures(len(tasks), len(os.listdir(f"/proc/{pid}/fd")), kib("VmRSS"), kib("VmHWM"),
                   tuple(sorted(thread_names)))


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
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux 4.0 and later)
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


def no_more_threads(before, now):
    """Whether `now` has no more threads than `before`, but for the two pools that size themselves to the load: gRPC's
    own, which may keep GRPC_POOL_SLACK more, and the RPC pool, which may keep RPC_POOL_SLACK more."""
    pools = {GRPC_POOL: GRPC_POOL_SLACK, RPC_POOL_NAME: RPC_POOL_SLACK}
    others = lambda figures: figures.threads - sum(figures.names.count(name) for name in pools)
    return others(now) <= others(before) and all(now.names.count(name) <= before.names.count(name) + slack
                                                 for name, slack in pools.items())


def settle(server, idle, threads=None):
    """Waits (bounded) until the server holds no more descriptors than at `idle` and, given the figures of an earlier
    round as `threads`, no more threads than then; its figures then."""
    pid = server.proc.pid
    back = lambda now: now.fds <= idle.fds and (threads is None or no_more_threads(threads, now))
    wait_until(lambda: back(figures_of(pid)), timeout=SETTLE_SECONDS)
    return figures_of(pid)


def connections_to(server):
    """The TCP connections the server still holds (ESTABLISHED or CLOSE_WAIT on its port), from /proc/net."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1:4:2]
                count += int(local.rsplit(":", 1)[1], 16) == server.port and state in ("01", "08")
    return count


# How many inits a server keeps ready for the next Starts.
READY_INITS = jobworker.InitPool.SIZE


def inits_ready(server, running=0):
    """Whether the server has made every init it keeps ready, and has those of its `running` jobs: it holds a pidfd
    of each, and each has given up its privilege (no_new_privs), the last step before it says it is ready. (An init
    sends its pidfd first, while it still prepares.)"""
    pidfds = 0
    for fd in os.listdir(f"/proc/{server.proc.pid}/fd"):
        with contextlib.suppress(OSError):
            pidfds += os.readlink(f"/proc/{server.proc.pid}/fd/{fd}") == "anon_inode:[pidfd]"
    if pidfds < READY_INITS + running:
        return False
    prepared = 0
    for init in (pid for launcher in launchers_of(server) for pid in children_of(launcher)):
        with contextlib.suppress(OSError):
            prepared += proc_status(init)["NoNewPrivs"] == "1"
    return prepared >= READY_INITS + running


def idle_server(pki, directory, *options):
    """A server of the test's own, once it has served a call of each kind, closed the connection and made its inits
    again: (server, its figures)."""
    server = Server(pki, directory, *options)
    client = server.client()
    job_id = client.start(["echo", "warm"])
    read_stream(client.stub, job_id)
    client.query(job_id)
    client.list()
    client.close()
    assert wait_until(lambda: connections_to(server) == 0), "the server kept a closed connection"
    assert wait_until(lambda: inits_ready(server)), "the server did not make its inits again"
    return server, figures_of(server.proc.pid)


def assert_settled(what, idle, after, peak, memory_slack=IDLE_MEMORY_SLACK):
    assert peak.threads <= RPC_POOL + OWN_THREADS, f"{what}: {peak.threads} threads at the peak"
    assert after.fds <= idle.fds, f"{what}: descriptors left behind ({idle.fds} idle, {after.fds} after)"
    kept = max(0, after.threads - idle.threads) * POOL_THREAD_MEMORY
    assert after.rss <= idle.rss + memory_slack + kept, \
        f"{what}: memory not given back ({idle.rss / MiB:.0f} MiB idle, {after.rss / MiB:.0f} MiB after)"


def assert_no_more_threads(what, before, after):
    assert no_more_threads(before, after), \
        f"{what}: threads grew ({before.threads} before: {before.names}; {after.threads} after: {after.names})"


def job_groups_left(server_pid, job_ids):
    """The cgroup directories of these (ended) jobs of a server that are still present."""
    return [path for path in cgroups_of(server_pid) if os.path.basename(path) in set(job_ids)]


RELIABILITY_FIGURES = []
HISTORY_FIGURES = []  # lines of their own: the figures of kept jobs


def record(scenario, jobs, clients, streamed, before, peak, after):
    RELIABILITY_FIGURES.append((scenario, jobs, clients, streamed, before, peak, after))


@pytest.fixture(scope="module")
def reliability_figures(request):
    """Collects the figures of the scenarios that measure the server, and prints them as a table at the end (and the
    lines of HISTORY_FIGURES after it)."""
    yield RELIABILITY_FIGURES
    if not RELIABILITY_FIGURES and not HISTORY_FIGURES:
        return
    lines = ["", "Reliability figures (server process; before = idle, peak = during, after = settled; memory is "
                 "VmRSS, peak VmHWM, MiB)", "",
             "| scenario | jobs | clients | bytes streamed | threads before / peak / after "
             "| descriptors before / peak / after | memory MiB before / peak / after |",
             "|---|---:|---:|---:|---:|---:|---:|"] if RELIABILITY_FIGURES else []
    for scenario, jobs, clients, streamed, before, peak, after in RELIABILITY_FIGURES:
        lines.append(f"| {scenario} | {jobs} | {clients} | {streamed:,} | {before.threads} / {peak.threads} / "
                     f"{after.threads} | {before.fds} / {peak.fds} / {after.fds} | {before.rss / MiB:.0f} / "
                     f"{peak.hwm / MiB:.0f} / {after.rss / MiB:.0f} |")
    lines += ["", *HISTORY_FIGURES] if HISTORY_FIGURES else []
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines))


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
    before, afters = idle, []
    for round_ in (1, 2):
        channels = [open_channel(server) for _ in range(LOAD_CHANNELS)]
        go, streaming = threading.Barrier(LOAD_JOBS + 1), threading.Barrier(LOAD_JOBS + 1)

        def client(i):
            stub = channels[i % LOAD_CHANNELS][1]
            go.wait(HANG_GUARD)
            code = LOAD_JOB.format(seed=round_ * 1000 + i, size=LOAD_BLOCK, order=LOAD_ORDER, hold=gate.hold(""))
            job_id = stub.Start(pb.StartRequest(command=py(code)), timeout=HANG_GUARD).job_id
            return read_stream(stub, job_id, first=lambda: streaming.wait(HANG_GUARD))

        with PeakWatch(pid) as watch:
            clients = Concurrently([functools.partial(client, i) for i in range(LOAD_JOBS)], (go, streaming))
            clients.meet(go)
            held = gate.hold_all(LOAD_JOBS, clients)  # every job is running, all at once
            clients.meet(streaming)  # and every job's stream is open, with its first bytes read
            for connection in held:
                connection.close()
            results = clients.results()
        for i, ran in enumerate(results):
            assert (ran.out, ran.err) == load_expected(round_ * 1000 + i), f"job {i}: output differs"
            assert ran.status.state == pb.EXITED and ran.status.exit_code == 0
            assert ran.status.output_bytes == ran.size
        for channel, _ in channels:
            channel.close()
        after = settle(server, idle, threads=afters[0] if afters else None)
        record(f"load, round {round_}: {LOAD_JOBS} jobs started at once, each streamed", LOAD_JOBS,
               f"{LOAD_JOBS} threads on {LOAD_CHANNELS} connections", sum(ran.size for ran in results), before,
               watch.peak, after)
        assert_settled(f"load round {round_}", idle, after, watch.peak)
        assert not job_groups_left(pid, [ran.status.job_id for ran in results])
        afters.append(after)
        before = after
    assert_no_more_threads(f"a second round of {LOAD_JOBS} jobs", afters[0], afters[1])
    assert afters[1].rss <= afters[0].rss + REPEAT_MEMORY_SLACK, \
        f"a second round of {LOAD_JOBS} jobs kept {(afters[1].rss - afters[0].rss) / MiB:.0f} MiB more"


# -- fan-out -----------------------------------------------------------------------------------------------------------

def test_reliability_fan_out_50_clients_of_one_100_mb_job_in_bounded_memory(pki, tmp_path, gate, reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    pid, clients, growth, afters = server.proc.pid, 50, {}, {}
    for blocks in (10, 100):  # MB each client reads: the bound must not depend on it
        channels = [open_channel(server) for _ in range(clients)]
        job_id = channels[0][1].Start(pb.StartRequest(command=py(
            gate.hold() + PATTERN_JOB.format(blocks=blocks, size=MiB))), timeout=HANG_GUARD).job_id
        attached = threading.Barrier(clients + 1)
        with PeakWatch(pid) as watch:
            readers = Concurrently([functools.partial(read_stream, stub, job_id, keep=False,
                                                      first=functools.partial(attached.wait, HANG_GUARD))
                                    for _, stub in channels], (attached,))
            readers.meet(attached)  # every client has its first bytes while the job is still held
            gate.open()
            results = readers.results()
        expected = b"ready\n" + pattern(blocks)
        for i, ran in enumerate(results):
            assert (ran.size, ran.sha256) == (len(expected), sha256(expected)), f"client {i}: {ran.size} bytes"
            assert ran.status.exit_code == 0
        for channel, _ in channels:
            channel.close()
        growth[blocks] = watch.peak.hwm - idle.rss
        afters[blocks] = settle(server, idle, threads=afters.get(10))
    record(f"fan-out: {clients} clients stream one job of 100 MB", 1, clients, clients * len(expected), idle,
           watch.peak, afters[100])
    assert growth[100] <= FAN_OUT_MEMORY_BOUND, f"peak memory grew by {growth[100] / MiB:.0f} MiB"
    assert growth[100] <= growth[10] + FAN_OUT_SIZE_SLACK, \
        f"peak memory grows with output size: {growth[10] / MiB:.0f} MiB for 10 MB, {growth[100] / MiB:.0f} for 100"
    assert_settled("fan-out", idle, afters[100], watch.peak)
    assert_no_more_threads("fan-out of 100 MB after 10 MB", afters[10], afters[100])


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
        reset (a shutdown alone leaves the server to time the silent connection out, up to 70 s later)."""
        connections = list(self.connections)
        self.flowing.set()
        super().close()
        for s in connections:
            s.close()


def test_reliability_clients_that_stop_reading_hold_up_neither_the_job_nor_other_clients(pki, tmp_path, gate,
                                                                                         reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    pid, blocks = server.proc.pid, 200
    channel, stub = open_channel(server)
    job_id = stub.Start(pb.StartRequest(command=py(gate.hold() + PATTERN_JOB.format(blocks=blocks, size=MiB))),
                        timeout=60).job_id
    proxy, stuck = PausableProxy(server.addr), []
    with PeakWatch(pid) as watch:
        for addr in (None,) * 3 + (proxy.addr,) * 3:  # 3 stop asking for messages, 3 stop reading the socket
            stuck_channel, stuck_stub = open_channel(server, addr=addr)
            call = stuck_stub.Stream(pb.StreamRequest(job_id=job_id), timeout=HANG_GUARD)
            assert next(call).data == b"ready\n"
            stuck.append((stuck_channel, call))
        proxy.flowing.clear()
        gate.open()
        ran = read_stream(stub, job_id, keep=False)  # another client reads it all, meanwhile
        assert status_of(lambda: stub.List(pb.ListRequest(), timeout=10)).code == OK  # and others are served
    expected = b"ready\n" + pattern(blocks)
    assert (ran.size, ran.sha256) == (len(expected), sha256(expected))
    assert ran.status.state == pb.EXITED and ran.status.exit_code == 0
    # 200 MB is far more than their flow-control windows hold: had the job or the reader waited for them, neither
    # would have ended while they read nothing.
    assert all(call.is_active() for _, call in stuck), "the server ended a stuck client's stream"
    assert watch.hwm - watch.start.rss <= 64 * MiB, \
        f"unread output is held in the server's memory: {(watch.hwm - watch.start.rss) / MiB:.0f} MiB"
    late, late_status = hashlib.sha256(b"ready\n"), None  # a stuck client that reads on gets the rest, in order
    for message in stuck[0][1]:
        late.update(message.data)
        late_status = message.status if message.HasField("status") else late_status
    assert late.hexdigest() == sha256(expected) and late_status.state == pb.EXITED
    for stuck_channel, call in stuck:
        call.cancel()
        stuck_channel.close()
    proxy.close()
    channel.close()
    after = settle(server, idle)
    record(f"stuck clients: 6 stop reading a {blocks} MB job, 1 reads it", 1, 7, ran.size, idle, watch.peak, after)
    assert_settled("stuck clients", idle, after, watch.peak)


STUBBORN_JOB = py("import os, signal\nsignal.signal(signal.SIGTERM, lambda *_: os.write(1, b'term\\n'))\n"
                  "os.write(1, b'ready\\n')\nwhile True:\n    signal.pause()\n")  # says each SIGTERM, and runs on
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
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        if how == "hello":
            sock.sendall(PARTIAL_CLIENT_HELLO)
        elif how in ("tls", "request"):
            sock = context.wrap_socket(sock, server_hostname="localhost")
            if how == "request":
                sock.sendall(h2_partial_call())
    finally:
        sock.close()


def hold_every_stream_slot(server, job_id, credentials="admin"):
    """Opens streams of `job_id` (which must have output) as `credentials` until the server refuses one: the caller
    has every stream it may have. Returns its channel and those streams, open."""
    channel, stub = open_channel(server, credentials)
    calls = []
    try:
        while len(calls) < RPC_POOL:
            calls.append(stub.Stream(pb.StreamRequest(job_id=job_id), timeout=120))
            code = status_of(lambda: next(calls[-1])).code
            if code != OK:
                assert code == Code.RESOURCE_EXHAUSTED, code
                return channel, calls[:-1]
        raise AssertionError(f"{len(calls)} streams of one caller, and the server took them all")
    except BaseException:
        for call in calls:
            call.cancel()
        channel.close()
        raise


def open_every_stream_slot(server, job_id):
    """Opens every stream an admin may have of `job_id`, closes them, and returns how many were open."""
    channel, calls = hold_every_stream_slot(server, job_id)
    for call in calls:
        call.cancel()
    channel.close()
    return len(calls)


def test_reliability_hundreds_of_vanishing_clients_leave_nothing_behind(pki, tmp_path, gate, reliability_figures):
    server, idle = idle_server(pki, str(tmp_path))
    pid, context = server.proc.pid, tls_context(pki)
    admin_channel, admin = open_channel(server)
    vanished = collections.Counter()
    code = "import sys\nsys.stdout.write('x' * 100000); sys.stdout.flush()\n" + gate.hold("")
    job_id = admin.Start(pb.StartRequest(command=py(code)), timeout=60).job_id
    wait_for_output(admin, job_id, b"x", offset=99999)
    assert wait_until(lambda: inits_ready(server, running=1)), "the server did not make its inits again"
    base = figures_of(pid)  # idle, with the job and the admin's connection open
    fill_every_stream_slot = functools.partial(open_every_stream_slot, server, job_id)

    with PeakWatch(pid) as watch:
        slots = fill_every_stream_slot()
        filled = settle(server, base)
        assert fill_every_stream_slot() == slots, "a stream slot was not given back"
        warmed = settle(server, base, threads=filled)  # memory at its working level for that many streams
        assert_no_more_threads(f"{slots} streams again", filled, warmed)
        assert_settled(f"{slots} streams closed by their client", base, warmed, watch.peak, BURST_MEMORY_SLACK)
        for round_ in range(4):
            proxy, calls = CuttableProxy(server.addr), []
            shared = {mode: open_channel(server) for mode in ("cancel", "deadline")}
            for mode in ("cancel", "deadline", "close", "cut") * 30:
                channel, stub = shared[mode] if mode in shared else \
                    open_channel(server, addr=proxy.addr if mode == "cut" else None)
                call = stub.Stream(pb.StreamRequest(job_id=job_id), timeout=2 if mode == "deadline" else 60)
                first = status_of(lambda: next(call)).code  # a deadline may pass before the first message
                assert first == OK or (mode, first) == ("deadline", Code.DEADLINE_EXCEEDED), (mode, first)
                calls.append((mode, channel, call))
            for mode, channel, call in calls:
                if mode == "cancel":
                    call.cancel()
                elif mode == "close":
                    channel.close()
            proxy.cut()  # as if the client's machine went away: no HTTP/2 goodbye
            for mode, channel, call in calls:
                assert status_of(lambda: list(call)).code != OK, mode
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
        repeated = settle(server, base, threads=plateau)
        assert_no_more_threads("vanishing clients, two more rounds", plateau, repeated)
        assert repeated.rss <= plateau.rss + REPEAT_MEMORY_SLACK, "vanishing clients: two more rounds grew memory " \
            f"from {plateau.rss / MiB:.0f} MiB to {repeated.rss / MiB:.0f} MiB"
        # Clients that vanish in the middle of a unary call: Stops waiting out jobs that ignore SIGTERM (each says
        # when it gets one: its Stop is then under way in the server).
        stubborn = [admin.Start(pb.StartRequest(command=STUBBORN_JOB), timeout=60).job_id for _ in range(20)]
        for stubborn_id in stubborn:
            wait_for_output(admin, stubborn_id, b"ready\n")
        stoppers = [open_channel(server) for _ in stubborn]
        futures = [stub.Stop.future(pb.StopRequest(job_id=stubborn_id, timeout_seconds=600), timeout=120)
                   for (_, stub), stubborn_id in zip(stoppers, stubborn)]
        for stubborn_id in stubborn:
            wait_for_output(admin, stubborn_id, b"ready\nterm\n")
        for channel, _ in stoppers:
            channel.close()
        for future in futures:
            assert status_of(future.result).code == Code.CANCELLED
            vanished["mid-Stop"] += 1
        for stubborn_id in stubborn:
            assert admin.Stop(pb.StopRequest(job_id=stubborn_id, force=True), timeout=60).signal == signal.SIGKILL
        assert fill_every_stream_slot() == slots, "a vanished client's stream slot was never given back"
        after = settle(server, base)
    assert_settled("vanishing clients", warmed, after, watch.peak, BURST_MEMORY_SLACK)
    gate.open()
    read_stream(admin, job_id)
    admin_channel.close()
    after = settle(server, idle)
    total = sum(vanished.values())
    record(f"vanishing: {total} clients go away mid-stream or mid-call", 1 + len(stubborn), total, 0, idle,
           watch.peak, after)
    assert_settled("vanishing clients", idle, after, watch.peak, BURST_MEMORY_SLACK)
    assert not job_groups_left(pid, [job_id, *stubborn])
    assert "Traceback" not in server.read_log()


def test_reliability_waits_hold_a_slot_each_and_give_it_back_however_their_client_ends_them(pki, tmp_path, gate):
    """A Wait holds a thread for as long as its job runs: it takes one of its caller's slots, as a stream does, so that
    Waits cannot take the threads other calls need; and it gives it back when its deadline passes, its client cancels
    it, closes its channel or goes away."""
    server = Server(pki, str(tmp_path))
    admin_channel, admin = open_channel(server)
    job_id = admin.Start(pb.StartRequest(command=py(gate.hold())), timeout=60).job_id
    wait_for_output(admin, job_id, b"ready\n")
    request, slots, extra = pb.WaitRequest(job_id=job_id), open_every_stream_slot(server, job_id), 8
    assert slots == (jobworker.Server.LONG_CALLS + jobworker.Server.ADMIN_SHARE) // 2  # an admin's, alone
    late = [admin.Wait.future(request, timeout=2) for _ in range(extra)]
    assert {status_of(wait.result).code for wait in late} == {Code.DEADLINE_EXCEEDED}
    # The client's deadline passes before the server's Wait wakes to give its slot back.
    assert wait_until(lambda: open_every_stream_slot(server, job_id) == slots), "a Wait past its deadline kept its slot"
    proxy = CuttableProxy(server.addr)
    ends = {"cancel": open_channel(server), "close": open_channel(server), "cut": open_channel(server, addr=proxy.addr)}
    waits = [(end, ends[end][1].Wait.future(request, timeout=300)) for end in list(ends) * ((slots + extra) // 3)]
    refusals = len(waits) - slots  # every slot is free: those whose deadline passed gave theirs back
    assert wait_until(lambda: sum(wait.done() for _, wait in waits) >= refusals), "the server took every Wait"
    refused = [wait for _, wait in waits if wait.done()]
    assert len(refused) == refusals and {status_of(wait.result).code for wait in refused} == {Code.RESOURCE_EXHAUSTED}
    held = [(end, wait) for end, wait in waits if wait not in refused]
    for end, wait in held:
        if end == "cancel":
            wait.cancel()
    ends["close"][0].close()
    proxy.cut()  # as if the client's machine went away
    for end, wait in held:
        assert wait.cancelled() if end == "cancel" else status_of(wait.result).code != OK, end  # the job still runs
    for channel, _ in ends.values():
        channel.close()
    proxy.close()
    assert wait_until(lambda: connections_to(server) == 1), "the server kept a closed connection"
    assert wait_until(lambda: open_every_stream_slot(server, job_id) == slots), "a Wait kept its slot"
    gate.open()
    assert admin.Wait(request, timeout=60).exit_code == 0
    admin_channel.close()


# -- callers that would starve the others ------------------------------------------------------------------------------

CALLS_OF_ONE_CALLER = jobworker.Server.CALLS // 2  # unary calls a caller other than an admin may hold, alone


def fire_stops(stub, job_id, count, refusals):
    """`count` Stops with the longest grace, all at once from one channel, of a job that ignores SIGTERM: once at
    least `refusals` of them have been refused (RESOURCE_EXHAUSTED, saying why), (those held, those refused)."""
    calls = [stub.Stop.future(pb.StopRequest(job_id=job_id, timeout_seconds=3600), timeout=300)
             for _ in range(count)]
    assert wait_until(lambda: sum(call.done() for call in calls) >= refusals), "the server held every Stop"
    done = [call.done() for call in calls]
    refused = [call for call, ended in zip(calls, done) if ended]
    for call in refused:
        error = call.exception()
        assert error.code() == Code.RESOURCE_EXHAUSTED and "calls in flight" in error.details(), error
    return [call for call, ended in zip(calls, done) if not ended], refused


STOPS = 500  # fired at once by one user, as the red team did (it fired 1,040)


def test_reliability_a_user_holding_every_stop_it_may_leaves_an_admin_room_to_list_and_force_stop(pki, tmp_path,
                                                                                                reliability_figures):
    """The red team's attack, bounded: one user fires hundreds of Stops with an hour's grace at its job, which ignores
    SIGTERM. The server holds the user's share and refuses the rest; every Stop joins the first (one SIGTERM); an
    admin still lists and force-stops the job, which ends every Stop held."""
    server, idle = idle_server(pki, str(tmp_path))
    user_channel, user = open_channel(server, "user")
    job_id = user.Start(pb.StartRequest(command=STUBBORN_JOB), timeout=60).job_id
    wait_for_output(user, job_id, b"ready\n")
    with PeakWatch(server.proc.pid) as watch:
        held, refused = fire_stops(user, job_id, STOPS, STOPS - CALLS_OF_ONE_CALLER)
        assert len(held) == CALLS_OF_ONE_CALLER, f"{len(held)} Stops held"
        assert refused[0].exception().details().startswith(
            f"O=jobworker,OU=user,CN=alice has {CALLS_OF_ONE_CALLER} calls in flight")
        listed = server.cli("list", "--json")
        assert listed.returncode == 0 and job_id in listed.stdout.decode(), listed.stderr
        stopped = server.cli("stop", "--force", "--json", job_id)
        assert stopped.returncode == 0 and json.loads(stopped.stdout)["signal"] == signal.SIGKILL, stopped.stderr
        for call in held:
            status = call.result(timeout=60)
            assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
        assert read_stream(user, job_id).out == b"ready\nterm\n", "not one SIGTERM for all the Stops"
        user_channel.close()
        after = settle(server, idle)
    record(f"stops: a user fires {STOPS} Stops (3600 s grace) at a job ignoring SIGTERM; an admin lists, force-stops",
           1, f"{STOPS} calls on 1 connection, 2 admin CLI calls", 0, idle, watch.peak, after)
    assert_settled("stops", idle, after, watch.peak)


def test_reliability_cancelled_stops_give_their_calls_back_and_the_stop_goes_on_until_a_shorter_grace(pki, tmp_path):
    """A Stop's wait ends when its client cancels it, and gives its call back; the job's stop goes on in the server,
    and a later Stop with a shorter grace brings its SIGKILL closer."""
    server = Server(pki, str(tmp_path))
    user_channel, user = open_channel(server, "user")
    job_id = user.Start(pb.StartRequest(command=STUBBORN_JOB), timeout=60).job_id
    wait_for_output(user, job_id, b"ready\n")

    def holds_every_call_it_may():
        held, _ = fire_stops(user, job_id, CALLS_OF_ONE_CALLER + 8, 8)
        for call in held:
            call.cancel()
        return len(held) == CALLS_OF_ONE_CALLER
    assert holds_every_call_it_may()
    assert wait_until(holds_every_call_it_may), "cancelled Stops kept their calls"
    assert user.Query(pb.QueryRequest(job_id=job_id), timeout=60).state == pb.RUNNING
    status = user.Stop(pb.StopRequest(job_id=job_id, timeout_seconds=0.5), timeout=60)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    assert read_stream(user, job_id).out == b"ready\nterm\n", "not one SIGTERM for all the Stops"
    user_channel.close()


def test_reliability_two_callers_holding_every_stream_they_may_leave_some_for_a_third_and_an_admin(pki, tmp_path,
                                                                                                  gate):
    """A caller may hold half of the stream slots the others leave free: the first alone holds half of them, the
    second a quarter, and a third caller and an admin still get streams."""
    server = Server(pki, str(tmp_path))
    job = py("print('x', flush=True)\n" + gate.hold(""))
    jobs = {role: server.client(role).start(job) for role in ("user", "user2")}
    held = [hold_every_stream_slot(server, jobs[role], role) for role in ("user", "user2")]
    assert [len(calls) for _, calls in held] == [jobworker.Server.LONG_CALLS // 2, jobworker.Server.LONG_CALLS // 4]
    for role in ("observer", "admin"):
        channel, stub = open_channel(server, role)
        assert next(stub.Stream(pb.StreamRequest(job_id=jobs["user"]), timeout=60)).data == b"x\n", role
        channel.close()
    for channel, calls in held:
        for call in calls:
            call.cancel()
        channel.close()
    gate.open()
    gate.open()


FLOOD = 600  # plain TCP connections that never say a word: more than the server's 512 descriptors


def test_reliability_a_flood_of_connections_that_never_handshake_leaves_callers_served_and_is_closed(
        pki, tmp_path, reliability_figures):
    """A server with 512 descriptors keeps half of them from connections: a caller connected before the flood still
    starts and streams a job, and the server closes every connection of the flood (past its share at once, the others
    when the handshake's few seconds have passed: well before the recv timeout, half of gRPC's default 120 s)."""
    server = Server(pki, str(tmp_path), prefix=("prlimit", "--nofile=512:512"))
    assert wait_until(lambda: inits_ready(server))
    idle = figures_of(server.proc.pid)
    channel, admin = open_channel(server)
    admin.List(pb.ListRequest(), timeout=60)
    with PeakWatch(server.proc.pid) as watch:
        flood = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(FLOOD)]
        try:
            job_id = admin.Start(pb.StartRequest(command=["echo", "served"]), timeout=60).job_id
            assert read_stream(admin, job_id).out == b"served\n"
            for sock in flood:
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(1) == b""
        finally:
            for sock in flood:
                sock.close()
        channel.close()
        channel, admin = open_channel(server)
        assert admin.Query(pb.QueryRequest(job_id=job_id), timeout=60).exit_code == 0
        channel.close()
        after = settle(server, idle)
    record(f"flood: {FLOOD} TCP connections that never handshake, to a server of 512 descriptors", 1,
           f"{FLOOD} sockets, 1 caller", len(b"served\n"), idle, watch.peak, after)
    assert_settled("flood", idle, after, watch.peak)


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
    ran = read_stream(admin.stub, job_id)
    assert (ran.out, ran.err, ran.status.state, ran.status.exit_code) == (b"early\n", b"late\n", pb.EXITED, 3)


def test_reliability_output_without_newlines_arrives_live_and_byte_exact(admin, gate):
    count = 20000  # single-byte writes, alternating stdout and stderr: 20000 runs in the log's index
    code = ("import os\nos.write(1, b'abc')\n" + gate.hold("") +
            f"for i in range({count}):\n    os.write(1 + i % 2, bytes([i % 251]))\n")
    job_id = admin.start(py(code))
    wait_for_output(admin.stub, job_id, b"abc")  # while the job waits at the gate: no newline is waited for
    gate.open()
    ran = read_stream(admin.stub, job_id)
    assert ran.out == b"abc" + bytes(i % 251 for i in range(0, count, 2))
    assert ran.err == bytes(i % 251 for i in range(1, count, 2))
    assert ran.status.exit_code == 0 and ran.status.output_bytes == count + 3
    for offset in (1, 3, 4, 5, count // 2 + 1, count + 2, count + 3):
        tail = read_stream(admin.stub, job_id, offset)
        assert tail.size == count + 3 - offset
        assert ran.out.endswith(tail.out) and ran.err.endswith(tail.err)


def test_reliability_a_job_writing_gigabytes_streams_them_all_in_bounded_memory(pki, tmp_path, reliability_figures):
    """Every byte arrives, in order (counted and digested), and the server's memory stays bounded."""
    server, idle = idle_server(pki, str(tmp_path), "--max-output", "3G")
    size = (2 << 30) + MiB  # past 2^31: offsets beyond any 32-bit integer
    free = shutil.disk_usage(tmp_path).free
    assert free >= size + 256 * MiB, f"the test needs {size / MiB + 256:.0f} MiB free in {tmp_path}: {free / MiB:.0f}"
    channel, stub = open_channel(server)
    try:
        job_id = stub.Start(pb.StartRequest(command=["sh", "-c", f"head -c {size} /dev/zero; printf END"]),
                            timeout=HANG_GUARD).job_id
        with PeakWatch(server.proc.pid) as watch:
            ran = read_stream(stub, job_id, keep=False)
        expected = hashlib.sha256()
        for _ in range(size // MiB):
            expected.update(bytes(MiB))
        expected.update(b"END")
        assert (ran.size, ran.sha256) == (size + 3, expected.hexdigest()) and ran.status.exit_code == 0, ran.status
        assert ran.status.output_bytes == size + 3
        assert read_stream(stub, job_id, size - 2).out == b"\0\0END"
        assert status_of(lambda: read_stream(stub, job_id, 1 << 32)).code == Code.OUT_OF_RANGE
        growth = watch.hwm - watch.start.rss
        assert growth <= 64 * MiB, f"{growth / MiB:.0f} MiB for {size} bytes"
        channel.close()
        after = settle(server, idle)
        record("gigabytes: one job writes 2 GiB + 1 MiB, one client streams it", 1, 1, ran.size, idle, watch.peak,
               after)
        assert_settled("a job writing gigabytes", idle, after, watch.peak)
    finally:
        channel.close()
        assert server.stop() == 0, server.read_log()
        shutil.rmtree(server.data_dir, ignore_errors=True)  # the 2 GiB log


def test_reliability_a_job_with_hundreds_of_children_and_grandchildren_stops_entirely(admin):
    label = marker()
    job_id = admin.start(["sh", "-c", f"sh -c 'sleep {label} & sleep {label}' & for i in $(seq 300); do sleep {label} "
                                      "& done; echo ready; wait"])
    wait_for_output(admin.stub, job_id, b"ready\n")
    # "ready" may come before the last shells' forks have become sleeps.
    assert wait_until(lambda: len(processes_with(f"sleep\0{label}")) == 302)
    status = admin.stop(job_id, timeout=10)
    assert status.state == pb.STOPPED and status.signal == signal.SIGTERM
    assert processes_with(label) == [], "a process of the stopped job is still running"
    assert read_stream(admin.stub, job_id).status.state == pb.STOPPED


@needs_root
def test_reliability_a_fork_bomb_that_ignores_sigterm_is_contained_and_stopped(admin):
    label = marker()
    code = (f"# {label}\nimport os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    job_id = admin.start(py(code), pids=64)
    wait_for_output(admin.stub, job_id, b"ready\n")
    assert wait_until(lambda: len(processes_with(label)) >= 64, timeout=30), "the bomb did not reach its limit"
    assert len(processes_with(label)) <= 64
    assert status_of(admin.list).code == OK  # the server still serves, with every process of the job spinning
    status = admin.stop(job_id, timeout=0.5)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    assert processes_with(label) == []
    assert read_stream(admin.stub, job_id).status.state == pb.STOPPED


def test_reliability_a_job_that_exits_while_its_children_live_on_ends_with_them(admin):
    """A job ends with its command, and takes what it left running (here: children in sessions of their own that
    ignore SIGTERM, SIGHUP and SIGINT and write without end)."""
    label = marker()
    code = (f"# {label}\nimport os, signal, sys\n"
            "for _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
            "            signal.signal(s, signal.SIG_IGN)\n"
            "        while True:\n            os.write(1, b'child\\n')\n"
            "print('parent leaves', flush=True)\n")
    ran = run_job(admin, py(code))
    assert ran.status.state == pb.EXITED and ran.status.exit_code == 0 and ran.status.output_bytes == ran.size
    assert b"parent leaves\n" in ran.out and set(ran.out.split(b"\n")) <= {b"child", b"parent leaves", b""}, \
        ran.out[-200:]
    assert processes_with(label) == [], "a child outlived its job"


def test_reliability_a_job_whose_processes_all_ignore_sigterm_and_write_is_stopped(admin):
    """A Stop escalates to SIGKILL once its grace has passed."""
    label = marker()
    code = (f"# {label}\nimport os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "for _ in range(3):\n    os.fork()\n"  # eight writers
            "while True:\n    os.write(1, b'x' * 4096)\n    time.sleep(0.001)\n")
    job_id = admin.start(py(code))
    wait_for_output(admin.stub, job_id, b"ready\n" + b"x" * MiB)
    reader = Concurrently([lambda: read_stream(admin.stub, job_id, keep=False)])
    status = admin.stop(job_id, timeout=0.5)
    assert status.state == pb.STOPPED and status.signal == signal.SIGKILL
    (ran,) = reader.results()
    assert ran.status.state == pb.STOPPED and ran.size == ran.status.output_bytes == status.output_bytes
    assert processes_with(label) == []


def test_reliability_a_job_that_stops_itself_can_be_queried_streamed_and_stopped(admin):
    label = marker()
    job_id = admin.start(["sh", "-c", f"sleep {label} & echo ready; kill -STOP 0; echo resumed; wait"])
    wait_for_output(admin.stub, job_id, b"ready\n")
    pids = processes_with(label) + [admin.query(job_id).pid]
    assert wait_until(lambda: all(proc_status(p)["State"].startswith("T") for p in pids), timeout=30)
    assert admin.query(job_id).state == pb.RUNNING
    streaming = admin.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=60)
    assert next(streaming).data == b"ready\n"
    status = admin.stop(job_id, timeout=20)
    assert status.state == pb.STOPPED and status.signal == signal.SIGTERM, "SIGTERM did not reach the stopped job"
    rest = list(streaming)
    assert rest and rest[-1].status.state == pb.STOPPED and b"".join(m.data for m in rest) == b""
    assert processes_with(label) == []


# -- kept jobs ---------------------------------------------------------------------------------------------------------

KEPT_JOBS = 10_000
KEPT_JOB_MEMORY = 8 * 1024  # bytes a kept ended job may cost the server


def started_server(pki, directory, *options, data_dir=None):
    """A server, how long it took to say it listens, and its figures once its inits are ready."""
    began = time.monotonic()
    server = Server(pki, directory, *options, data_dir=data_dir)
    took = time.monotonic() - began
    assert wait_until(lambda: inits_ready(server)), "the server did not make its inits"
    return server, took, figures_of(server.proc.pid)


def test_reliability_10000_kept_jobs_load_cost_little_memory_and_retention_gives_it_back(pki, tmp_path,
                                                                                        reliability_figures):
    """A data directory of KEPT_JOBS ended jobs (one real job's directory, copied under new ids): a server loads them
    all (how long that takes is reported; the benchmark holds it to its target), each costs it at most KEPT_JOB_MEMORY,
    and a server that keeps none (--keep-jobs 0) loads them and removes them all (its memory then is reported: the
    allocator keeps what was freed for reuse; the next test shows that nothing of a removed job stays)."""
    seed = Server(pki, str(tmp_path / "seed"))
    seed_id = run_job(seed.client(), ["echo", "kept"]).status.job_id
    assert seed.stop() == 0
    data_dir, seed_dir = str(tmp_path / "kept"), job_dir(seed, seed_id)
    record = read_record(seed, seed_id)
    for i in range(KEPT_JOBS):
        job_id = str(uuid.uuid4())
        os.makedirs(os.path.join(data_dir, "jobs", job_id))
        for name in ("output", "runs"):
            shutil.copyfile(os.path.join(seed_dir, name), os.path.join(data_dir, "jobs", job_id, name))
        with open(os.path.join(data_dir, "jobs", job_id, "record.json"), "w") as f:
            json.dump(dict(record, job_id=job_id, started_at=record["started_at"] + i / 1000,
                           ended_at=record["ended_at"] + i / 1000), f)

    empty, empty_start, idle = started_server(pki, str(tmp_path / "empty"))
    assert empty.stop() == 0
    full, full_start, loaded = started_server(pki, str(tmp_path / "full"), "--keep-jobs", str(KEPT_JOBS),
                                              data_dir=data_dir)
    admin = full.client()
    assert len(admin.list()) == KEPT_JOBS and read_stream(admin.stub, job_id).out == b"kept\n"  # the last copy
    assert full.stop() == 0
    pruning, _, _ = started_server(pki, str(tmp_path / "pruning"), "--keep-jobs", "0", data_dir=data_dir)
    with_records = lambda: [name for name in os.listdir(os.path.join(data_dir, "jobs"))
                            if os.path.exists(os.path.join(data_dir, "jobs", name, "record.json"))]
    assert wait_until(lambda: not with_records(), timeout=300), f"{len(with_records())} jobs kept with --keep-jobs 0"
    assert pruning.client().list() == []
    after = figures_of(pruning.proc.pid)
    per_job = (loaded.rss - idle.rss) / KEPT_JOBS
    HISTORY_FIGURES.extend([
        f"Kept jobs ({KEPT_JOBS:,} ended jobs loaded from their records):",
        f"  start, to listening: {empty_start:.2f} s on an empty data directory, {full_start:.2f} s on {KEPT_JOBS:,} "
        f"jobs",
        f"  server memory (VmRSS, inits ready): {idle.rss / MiB:.1f} MiB idle, {loaded.rss / MiB:.1f} MiB with "
        f"{KEPT_JOBS:,} jobs ({per_job / 1024:.2f} KiB per job), {after.rss / MiB:.1f} MiB once retention has "
        f"removed them all (the allocator keeps what was freed, for reuse)"])
    assert per_job <= KEPT_JOB_MEMORY, HISTORY_FIGURES[-1]


RETAINED_JOBS, RETENTION_ROUND = 500, 1000
REMOVED_JOB_MEMORY = 2048  # bytes a job removed by retention may leave behind in the server, on average (a kept
                           # job costs about 6 KiB: one that stayed whole would show, as would most of it)


def test_reliability_retention_keeps_the_memory_of_a_server_running_job_after_job_flat(pki, tmp_path,
                                                                                   reliability_figures):
    """Real jobs, RETENTION_ROUND at a time, on a server keeping RETAINED_JOBS: after each round the server holds the
    newest RETAINED_JOBS ended jobs, and once the allocator has settled (two rounds) later rounds (each job of them
    started, ended and then removed by retention) leave its memory where it was, within REMOVED_JOB_MEMORY per job."""
    server, _, idle = started_server(pki, str(tmp_path), "--keep-jobs", str(RETAINED_JOBS))
    channels = [open_channel(server) for _ in range(8)]

    def run_round():
        def starts(stub):
            return [stub.Start(pb.StartRequest(command=["true"]), timeout=60).job_id
                    for _ in range(RETENTION_ROUND // len(channels))]
        started = sum(Concurrently([functools.partial(starts, stub) for _, stub in channels]).results(), [])
        admin = server.client()
        settled = lambda: len(admin.list()) == RETAINED_JOBS and not admin.list(state=pb.RUNNING)
        assert wait_until(settled, timeout=120), "retention did not keep the newest jobs alone"
        kept = {status.job_id for status in admin.list()}
        assert kept <= set(started)
        admin.close()
        return figures_of(server.proc.pid)

    rounds = [run_round() for _ in range(4)]
    for channel, _ in channels:
        channel.close()
    left = (rounds[3].rss - rounds[1].rss) / (2 * RETENTION_ROUND)
    HISTORY_FIGURES.extend([
        f"Retention with real jobs (--keep-jobs {RETAINED_JOBS}, rounds of {RETENTION_ROUND} `true` from 8 threads):",
        f"  server memory: {idle.rss / MiB:.1f} MiB idle, after rounds 1-4: "
        f"{' / '.join(f'{r.rss / MiB:.1f}' for r in rounds)} MiB ({left:.0f} bytes per job removed in rounds 3-4)"])
    assert left <= REMOVED_JOB_MEMORY, HISTORY_FIGURES[-1]


# -- server faults -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_reliability_server_signal_with_jobs_running_and_streams_open_exits_cleanly(pki, tmp_path, gate, sig):
    """SIGTERM or SIGINT: the server stops every job and exits; every stream ends, with its job's final status or a
    clean status; nothing the server started is left: no job's process, no cgroup, no other process of its."""
    server = Server(pki, str(tmp_path))
    pid, label = server.proc.pid, marker()
    channel, stub = open_channel(server)
    jobs = {
        "writer": ["sh", "-c", f"echo ready; while :; do echo {label}; done"],
        "stopped": ["sh", "-c", f"sleep {label} & echo ready; kill -STOP 0; wait"],
        "stubborn": py(f"# {label}\nimport os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                       f"os.fork()\nprint('ready', flush=True)\ntime.sleep({label})"),
        "held": py(f"# {label}\n" + gate.hold()),
    }
    ids = {name: stub.Start(pb.StartRequest(command=command), timeout=60).job_id for name, command in jobs.items()}
    streams = [(name, offset) for name in ids for offset in (0, 5)]  # 5: the last byte of "ready\n", then more
    attached = threading.Barrier(len(streams) + 1)

    def read(name, offset):
        reader_channel, reader_stub = open_channel(server)
        try:
            return status_of(lambda: read_stream(reader_stub, ids[name], offset, keep=False,
                                                 first=functools.partial(attached.wait, 60)))
        finally:
            reader_channel.close()

    readers = Concurrently([functools.partial(read, *stream) for stream in streams], (attached,))
    readers.meet(attached)  # every stream has had its first message
    stopping = stub.Stop.future(pb.StopRequest(job_id=ids["stubborn"], timeout_seconds=600), timeout=120)
    waiting = stub.Wait.future(pb.WaitRequest(job_id=ids["held"]), timeout=120)
    started = children_of(pid)  # the launcher and the inits it made
    assert started
    server.proc.send_signal(sig)
    assert server.proc.wait(60) == 0, server.read_log()  # the Stop's 600 s grace does not hold it
    assert processes_with(label) == [], "a job outlived its server"
    assert all(not os.path.exists(f"/proc/{child}") or proc_status(child)["State"].startswith("Z")
               for child in started), "a process of the server outlived it"
    assert not cgroups_of(pid), "a cgroup outlived its server"
    log = server.read_log()
    assert f"{signal.Signals(sig).name}: stopping every job" in log and "Traceback" not in log, log[-2000:]
    assert status_of(lambda: stopping.result(60)).code in (OK, Code.UNAVAILABLE, Code.CANCELLED)
    waited = status_of(lambda: waiting.result(60))
    assert waited.code in (OK, Code.UNAVAILABLE, Code.CANCELLED) and (not waited.response or
                                                                       waited.response.state == pb.STOPPED), waited
    for (name, offset), (code, ran) in zip(streams, readers.results()):
        assert code in (OK, Code.UNAVAILABLE, Code.CANCELLED), (name, offset, code)
        if code == OK:
            assert ran.status.state == pb.STOPPED, (name, offset, ran.status)
            assert ran.size == ran.status.output_bytes - offset, \
                f"{name}: {ran.size} of {ran.status.output_bytes - offset} bytes"


def test_reliability_a_server_with_bad_configuration_exits_at_once_with_a_clear_message(pki, tmp_path):
    cert, key = pki.server
    files = tmp_path / "files"
    files.mkdir()
    (files / "garbage.pem").write_text("not a certificate\n")
    (files / "empty.pem").write_text("")
    (files / "dir.pem").mkdir()
    unreadable = {}
    for name, source in (("cert", cert), ("key", key), ("ca", pki.ca_cert)):
        unreadable[name] = files / f"unreadable-{name}.pem"
        shutil.copy(source, unreadable[name])
        os.chmod(unreadable[name], 0)
    (files / "a-file").write_text("")
    good = {"cert": cert, "key": key, "ca": pki.ca_cert}

    # Root reads any file; without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from the bounding set, so gone
    # at exec), a mode 000 one no more. They are dropped by a fresh interpreter that then runs the server: Python run
    # in a fork of this process (a preexec_fn) can crash, since gRPC's threads here hold its locks.
    without_file_capabilities = [sys.executable, "-c", "import ctypes, os, sys; libc = ctypes.CDLL(None); "
                                 "[libc.prctl(24, c, 0, 0, 0) for c in (1, 2)]; os.execv(sys.argv[1], sys.argv[1:])"]

    def serve(what, *, data=None, addr="127.0.0.1:0", capabilities=True, names=(), flags=(), **paths):
        """Starts a server that must refuse to; returns a problem with it, or None."""
        argv = [sys.executable, JOBWORKER, "serve", "--addr", addr, "--data-dir", str(data or tmp_path / "data"),
                *flags]
        for name, path in dict(good, **paths).items():
            argv += [f"--{name}", str(path)]
        if not capabilities and ROOT:
            argv = without_file_capabilities + argv
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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

    with socket.create_server(("127.0.0.1", 0)) as taken:
        problems = [
            serve("no such certificate", cert=files / "nope.pem"),
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
            serve("data directory under a file", data=files / "a-file" / "sub"),
            serve("data directory on a read-only file system", data="/sys/kernel/jobworker"),
            serve("port out of range", addr="127.0.0.1:99999"),
            serve("port in use", addr=f"127.0.0.1:{taken.getsockname()[1]}"),
            serve("a default above the maximum", flags=("--default", "pids=500", "--max", "pids=100"), names=["pids"]),
            serve("a default memory below 4 MiB", flags=("--default", "memory=1M"), names=["memory_bytes"]),
            serve("a maximum memory below 4 MiB", flags=("--max", "memory=1M"), names=["maximum memory_bytes"]),
            serve("a default disk limit below 2 bytes a second", flags=("--default", "io-write-bps=1"),
                  names=["io_write_bps"]),
        ]
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


# -- hostile input -----------------------------------------------------------------------------------------------------

SAFE_PROGRAMS = {"true", "echo"}  # what generated commands may run (names that would run anything else are left out)
METHODS = ("Start", "Stop", "Query", "Stream", "List", "Wait", "Remove")
REQUEST_TYPES = {"Start": pb.StartRequest, "Stop": pb.StopRequest, "Query": pb.QueryRequest,
                 "Stream": pb.StreamRequest, "List": pb.ListRequest, "Wait": pb.WaitRequest,
                 "Remove": pb.RemoveRequest}
INVALID, NOT_FOUND, RESOURCE_EXHAUSTED = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED
HOSTILE = settings(deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large])


def resolve_program(name):
    """The file a job's exec would run for `name` (its PATH, its working directory), or None. A transient user starts
    in its own /tmp, empty, where no relative name is found; others in /."""
    if ROOT and "/" in name and not name.startswith("/"):
        return None
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
        return status_of(lambda: list(call(data, timeout=60))).code
    call = channel.unary_unary(f"/jobworker.v1.JobWorker/{method}")
    return status_of(lambda: call(data, timeout=60)).code


class Hostile:
    """A server of this module's own for hostile requests, with jobs the requests can name."""

    def __init__(self, pki, directory):
        self.server = Server(pki, directory)
        self.channel, self.stub = open_channel(self.server)
        self.held = Gate()
        self.running = self.stub.Start(pb.StartRequest(command=py(self.held.hold())), timeout=60).job_id
        wait_for_output(self.stub, self.running, b"ready\n")
        self.ended = self.stub.Start(pb.StartRequest(command=["sh", "-c", "printf abc; printf DEF >&2; printf ghi"]),
                                     timeout=60).job_id
        self.ended_output = [(m.source, m.data) for m in self.stub.Stream(pb.StreamRequest(job_id=self.ended),
                                                                          timeout=60) if m.data]
        self.unavailable = set()  # limits this server cannot enforce (FAILED_PRECONDITION when asked for)
        for name in pb.Limits.DESCRIPTOR.fields_by_name:
            value = 0.5 if name == "cpu_cores" else (64 * MiB if name == "memory_bytes" else 100)
            code = status_of(lambda: self.stub.Start(pb.StartRequest(
                command=["true"], limits=pb.Limits(**{name: value})), timeout=60)).code
            assert code in (OK, Code.FAILED_PRECONDITION), (name, code)
            if code != OK:
                self.unavailable.add(name)

    def job_id(self, text):
        return {"@running": self.running, "@ended": self.ended}.get(text, text)

    def still_serves(self):
        assert status_of(lambda: self.stub.List(pb.ListRequest(), timeout=30)).code == OK, "List fails after a request"

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


def host_memory():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


HOST_MEMORY = host_memory()  # the most a job may ask for, out of the box


def start_outcome(hostile, request):
    if request.ByteSize() > jobworker.MAX_REQUEST_BYTES:
        return {RESOURCE_EXHAUSTED}
    command, limits = list(request.command), request.limits
    if not command or not command[0] or any("\0" in arg for arg in command):
        return {INVALID}
    cores = limits.cpu_cores
    invalid = (not math.isfinite(cores) or cores < 0 or cores > os.cpu_count() or limits.memory_bytes > HOST_MEMORY
               or 0 < limits.memory_bytes < 4 * MiB or limits.pids > 32768
               or 1 in (limits.io_read_bps, limits.io_write_bps))
    unavailable = any(getattr(limits, name) for name in hostile.unavailable)
    if invalid or unavailable:
        return ({INVALID} if invalid else set()) | ({Code.FAILED_PRECONDITION} if unavailable else set())
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
@example(command=["true"], limits=pb.Limits(io_read_bps=2, io_write_bps=1))  # cgroup v2 refuses 1
def test_reliability_hostile_start_requests(hostile, command, limits):
    request = pb.StartRequest(command=command, limits=limits)
    allowed = start_outcome(hostile, request)
    code, response = status_of(lambda: hostile.stub.Start(request, timeout=60))
    if code == OK:
        assert list(response.status.command) == command and response.status.owner == SUBJECT["admin"]
        hostile.stub.Stop(pb.StopRequest(job_id=response.job_id, force=True), timeout=60)
    assert code in allowed, (code, allowed, [a[:40] for a in command[:5]], len(command), limits)
    hostile.still_serves()


# Variables and working directories: PATH is left out (a PATH of the client's could find programs other than the
# harmless ones), and each directory maps to where the job starts in it (None: it cannot start there).
NAMES = st.one_of(st.sampled_from(["", "=", "A=B", "A\0", "\0", "HOME", "LANG", "USER", "X", "é", "a b", "\n"]), TEXT,
                  st.text(st.characters(codec="utf-8", exclude_characters="\0="), min_size=1, max_size=30)
                  ).filter(lambda name: name != "PATH")
VALUES = st.one_of(TEXT, ODD_TEXT, st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30),
                   st.integers(0, 80 * 1024).map(lambda n: "v" * n))
WORKING_DIRECTORIES = {"": "/tmp" if ROOT else "/", "/": "/", "/tmp": "/tmp", "/proc": "/proc", "/tmp/": "/tmp",
                       "relative": None, ".": None, "/no/such": None, "/etc/passwd": None, "/root": None,
                       "/tmp\0x": None, "é": None, "/" + "x" * 300: None, "/" + "x" * 5000: None}


def variables_outcome(request):
    """What a Start of a harmless command with these variables and this working directory must get."""
    if request.ByteSize() > jobworker.MAX_REQUEST_BYTES:
        return RESOURCE_EXHAUSTED
    env = dict(request.env)
    size = sum(len(name.encode()) + len(value.encode()) + 2 for name, value in env.items())
    if any(not name or "=" in name or "\0" in name for name in env) or any("\0" in v for v in env.values()) or \
            size > jobworker.MAX_VARIABLES_BYTES:
        return INVALID
    return OK if WORKING_DIRECTORIES[request.working_directory] else INVALID


@settings(HOSTILE, max_examples=60)
@given(env=st.dictionaries(NAMES, VALUES, max_size=5), directory=st.sampled_from(list(WORKING_DIRECTORIES)))
@example(env={"BIG": "x" * (4 * MiB)}, directory="")                                # over the request limit
@example(env={"V": "x" * (jobworker.MAX_VARIABLES_BYTES - 4)}, directory="/tmp")   # all the room there is
@example(env={"V": "x" * (jobworker.MAX_VARIABLES_BYTES - 3)}, directory="/tmp")   # a byte more
def test_reliability_hostile_variables_and_working_directories(hostile, env, directory):
    """Any variables and working directory: refused as the README says, or the job's own, byte-exact (its shell's
    environment, as the kernel gave it, and its working directory)."""
    request = pb.StartRequest(command=["sh", "-c", "readlink /proc/$$/cwd; cat /proc/$$/environ"], env=env,
                              working_directory=directory)
    expected = variables_outcome(request)
    code, response = status_of(lambda: hostile.stub.Start(request, timeout=60))
    assert code == expected, (code, expected, {k[:20]: v[:20] for k, v in env.items()}, directory[:40])
    if code == OK:
        ran = read_stream(hostile.stub, response.job_id)
        cwd, _, environ = ran.out.partition(b"\n")
        seen = dict(entry.split(b"=", 1) for entry in environ.split(b"\0") if entry)
        assert cwd.decode() == WORKING_DIRECTORIES[directory] and ran.status.exit_code == 0, ran
        assert {name.encode(): value.encode() for name, value in env.items()}.items() <= seen.items()
        assert dict(ran.status.env) == env and ran.status.working_directory == WORKING_DIRECTORIES[directory or ""]
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
        allowed = {Code.OUT_OF_RANGE}
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
    ran = read_stream(hostile.stub, response.job_id)
    assert ran.out == b"".join(a.encode() + b"\n" for a in arguments or [""]) and ran.status.exit_code == 0, ran.err
    assert list(hostile.stub.Query(pb.QueryRequest(job_id=response.job_id), timeout=60).command) == command


def test_reliability_oversized_requests_are_refused_before_they_cost_memory(hostile):
    huge = 64 * MiB
    requests = {
        "Start": pb.StartRequest(command=["true", "x" * (4 * huge)]),
        "Stop": pb.StopRequest(job_id="s" * huge),
        "Query": pb.QueryRequest(job_id="q" * huge),
        "Stream": pb.StreamRequest(job_id="t" * huge),
        "List": b"\x0a" + encode_varint(huge) + b"l" * huge,  # a field List does not know: read all the same
        "Wait": pb.WaitRequest(job_id="w" * huge),
        "Remove": pb.RemoveRequest(job_id="r" * huge),
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
        f"seven requests of {huge >> 20} to {huge >> 18} MiB raised the peak memory by {growth / MiB:.0f} MiB"


# -- identity ----------------------------------------------------------------------------------------------------------

def subject_types(cert):
    """The subject with each value's ASN.1 string type, as openssl prints it ("CN=UTF8STRING:ada,OU=...")."""
    return subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-subject", "-nameopt", "RFC2253,show_type"],
                          check=True, capture_output=True, text=True).stdout


def test_reliability_identity_matrix_every_kind_of_certificate_against_every_rpc(server, pki):
    """Every kind of caller against all seven RPCs: the role is the one OU of the subject that names a role, read from
    the DER (a value that merely looks like an OU is not one), the identity its one CN; anything else is refused,
    from the TLS handshake (no certificate, another CA, expired, plaintext) to TLS 1.2."""
    DENIED, UNAUTHENTICATED, HANDSHAKE = Code.PERMISSION_DENIED, Code.UNAUTHENTICATED, Code.UNAVAILABLE
    everything = dict.fromkeys(METHODS, OK)
    observes = {"Start": DENIED, "Stop": DENIED, "Query": OK, "Stream": OK, "List": OK, "Wait": OK,
                "Remove": DENIED}
    every = lambda code: dict.fromkeys(METHODS, code)
    now = time.time()
    other = PKI(os.path.join(pki.dir, "matrix-other"))
    leaf = lambda name, subject, **kwargs: pki.leaf(f"matrix-{name}", subject, **kwargs)

    def tls(credentials, encoding=None):
        if encoding:
            assert f"OU={encoding}:" in subject_types(credentials[0]), subject_types(credentials[0])
        return lambda: (open_channel(server, credentials)[0], None)

    def through_tls_proxy(version, negotiated):
        def connect():
            proxy = TLSProxy(server, "admin", version)

            def close():
                proxy.close()
                assert proxy.versions and set(proxy.versions) == {negotiated}, proxy.versions
            return grpc.insecure_channel(proxy.addr), close
        return connect

    rows = [  # (who calls, how it connects, the outcome of each RPC, the identity its jobs get)
        ("admin", tls(pki.roles["admin"], "UTF8STRING"), everything, SUBJECT["admin"]),
        ("user", tls(pki.roles["user"], "UTF8STRING"), everything, SUBJECT["user"]),
        ("observer", tls(pki.roles["observer"], "UTF8STRING"), observes, None),
        ("admin, PrintableString subject", tls(leaf("printable", "/O=jobworker/OU=admin/CN=pat", mask="pkix"),
                                                "PRINTABLESTRING"), everything, "O=jobworker,OU=admin,CN=pat"),
        ("user, BMPString subject, non-ASCII CN", tls(leaf("bmp", "/O=jobworker/OU=user/CN=Zoë", mask="MASK:0x800"),
                                                       "BMPSTRING"), everything, "O=jobworker,OU=user,CN=Zoë"),
        ("observer, UTF8String CN beyond the BMP", tls(leaf("astral", "/O=jobworker/OU=observer/CN=Zoë 😀"),
                                                        "UTF8STRING"), observes, None),
        ("user, OU and CN in one multi-valued RDN", tls(leaf("multi", "/O=jobworker/OU=user+CN=mv")), everything,
         "O=jobworker,CN=mv+OU=user"),
        ("observer, a CN holding ',OU=admin'", tls(leaf("comma", "/O=jobworker/OU=observer/CN=eve\\,OU=admin")),
         observes, None),
        ("observer, a CN holding '+OU=admin'", tls(leaf("plus", "/O=jobworker/OU=observer/CN=eve\\+OU=admin")),
         observes, None),
        ("user, an O holding 'OU=admin'", tls(leaf("org", "/O=OU=admin/OU=user/CN=o")), everything,
         "O=OU\\=admin,OU=user,CN=o"),
        ("T61String subject (not decodable: refused)", tls(leaf("t61", "/O=jobworker/OU=admin/CN=tex", mask="MASK:0x4"),
                                                            "T61STRING"), every(UNAUTHENTICATED), None),
        ("no role", tls(leaf("norole", "/O=jobworker/CN=nora")), every(DENIED), None),
        ("two roles", tls(leaf("two", "/O=jobworker/OU=user/OU=observer/CN=duo")), every(DENIED), None),
        ("the same role twice", tls(leaf("twice", "/O=jobworker/OU=admin/OU=admin/CN=twice")), every(DENIED), None),
        ("unknown role", tls(leaf("unknown", "/O=jobworker/OU=superuser/CN=sue")), every(DENIED), None),
        ("a role in capitals", tls(leaf("caps", "/O=jobworker/OU=ADMIN/CN=cap")), every(DENIED), None),
        ("no CN", tls(leaf("nocn", "/O=jobworker/OU=admin")), every(UNAUTHENTICATED), None),
        ("a blank CN", tls(leaf("blank", "/O=jobworker/OU=admin/CN= ")), every(UNAUTHENTICATED), None),
        ("a CN of whitespace", tls(leaf("whitespace", "/O=jobworker/OU=admin/CN=\t\u3000")), every(UNAUTHENTICATED),
         None),
        ("a CA's certificate (CA:TRUE) with an admin OU", tls(leaf("ca", "/O=jobworker/OU=admin/CN=ca", is_ca=True)),
         every(UNAUTHENTICATED), None),
        ("signed by another CA", tls(other.leaf("matrix-stranger", "/O=jobworker/OU=admin/CN=mallory")),
         every(HANDSHAKE), None),
        ("expired", tls(leaf("expired", "/O=jobworker/OU=admin/CN=old", start=now - 86400 * 10, end=now - 86400)),
         every(HANDSHAKE), None),
        ("not yet valid", tls(leaf("future", "/O=jobworker/OU=admin/CN=new", start=now + 86400, end=now + 86400 * 10)),
         every(HANDSHAKE), None),
        ("the server's certificate", tls(pki.server), every(HANDSHAKE), None),
        ("serverAuth-only certificate with an admin OU", tls(leaf("serverauth", "/O=jobworker/OU=admin/CN=srv",
                                                                  usage="serverAuth")), every(HANDSHAKE), None),
        ("no client certificate", tls(None), every(HANDSHAKE), None),
        ("plaintext", lambda: (grpc.insecure_channel(server.addr), None), every(HANDSHAKE), None),
        ("admin over TLS 1.2", through_tls_proxy(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), every(UNAUTHENTICATED), None),
        ("admin over TLS 1.3, through the same proxy", through_tls_proxy(ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
         everything, SUBJECT["admin"]),
    ]
    admin = server.client("admin")
    target = admin.start(["sh", "-c", "echo running; exec sleep 600"])  # another's job, for those that may not start
    ended = admin.start(["true"])  # and another's that has ended, for their Wait and Remove
    admin.wait(ended)
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
            got["Stream"] = status_of(lambda: first_message(job_id)).code
            got["List"] = status_of(lambda: stub.List(pb.ListRequest(), timeout=10)).code
            got["Stop"] = status_of(lambda: stub.Stop(pb.StopRequest(job_id=job_id, force=True), timeout=10)).code
            waited = started.job_id if started else ended  # ended by now: the Wait returns at once
            got["Wait"] = status_of(lambda: stub.Wait(pb.WaitRequest(job_id=waited), timeout=10)).code
            got["Remove"] = status_of(lambda: stub.Remove(pb.RemoveRequest(job_id=waited), timeout=10)).code
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
    assert admin.query(ended).state == pb.EXITED, "a caller without the right removed another's job"
    admin.stop(target, force=True)
    assert not mismatches, "\n".join(mismatches)
