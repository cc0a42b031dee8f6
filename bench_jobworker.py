#!/usr/bin/env python3
"""The jobworker benchmark: `make bench` (BENCH_QUICK=1 for a short run).

It makes fresh certificates, starts its own servers on loopback, and in the same run measures the service and the
baselines it is judged against, then prints a table and, as its very last line, one JSON object with every figure,
every ratio to its baseline and every target's outcome, so that runs can be compared.

    baselines  raw pipe throughput (head -c N /dev/zero | cat > /dev/null); local spawn latency of /bin/true from
               Python's subprocess; the framework ceiling: a bare gRPC server-streaming RPC over the same mutual TLS,
               sending the same bytes in the same messages, in a process of its own
    start      Start round trip on a warm channel, isolation on and off: back to back; after 100 ms idle (a client
               that is not in a loop), taking turns with a Query of an ended job after the same idle, the authorized
               round trip it is judged against, as both pay for waking idle CPUs; Start-to-exit (Start, then the
               stream's end); and Starts per second from 8 client threads (a channel each) back to back, against
               Python's own spawn of /bin/true from as many threads
    stream     one client receiving a job's output (head -c N /dev/zero) through the API while the job runs, and
               through the CLI into /dev/null; also, to tell the causes apart, the same job's output streamed again
               once it has ended, and how fast the server took the output in (the job's run time)
    fan-out    many clients streaming one job at once; every client's bytes checked; server memory growth at two
               output sizes
    scale      many `sleep 60` jobs running at once, on a fresh server: time to start them, the server's memory,
               and each job's PSS (its init and its command); then Stop (force) them all
    kept       a server's start, to listening, on a data directory of 10,000 ended jobs, against one on none

Machines here are noisy: repetitions are interleaved (e.g. pipe, ceiling, API, CLI, then again) and medians are
reported. Every server's peak memory (VmHWM, reset at the start of each phase) and peak thread count are recorded per
phase. MB means 2**20 bytes everywhere.

Nothing is left behind: every server is stopped with SIGTERM (SIGKILL if it does not go), the processes it started
are checked to be gone, and the temporary directory is removed, whatever happens; should the bench itself be killed,
its servers get SIGTERM and its helper processes SIGKILL from the kernel (PR_SET_PDEATHSIG).

Environment: BENCH_QUICK=1 for a short run (64 MB streams, 100 starts back to back and 20 paced, 100 per run of the
start rate, 16 fan-out clients, 100 scale jobs);
BENCH_FANOUT_PROCS (default 2) for the number of processes the fan-out clients are spread over; TMPDIR for where the
certificates and the servers' data (job output: several GB in a full run) go; with --isolation on it must be on a
block device (the server refuses to run with disk limits unavailable).

Exit status: 0 when every phase ran and every server stopped cleanly (targets may still FAIL: see the table), 1 when
a phase could not be measured or a server misbehaved (see "errors" in the JSON).

    bench_jobworker.py --paced-starts REV [REV...]

measures only the paced Start and Query (as the start phase does, BENCH_PACED_ROUNDS of each, default 100) of the
jobworker.py of each git revision (a commit, a branch, HEAD), isolation off and on, on servers running side by side,
their calls interleaved: what a change costs a Start, on a machine too noisy for runs minutes apart to tell.
"""

import contextlib
import json
import math
import os
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jobworker  # noqa: E402
import grpc  # noqa: E402
from gen import jobworker_pb2 as pb  # noqa: E402

JOBWORKER = os.path.join(HERE, "jobworker.py")
MB = 1 << 20
CHUNK = jobworker.STREAM_CHUNK
QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")

if QUICK:
    STREAM_BYTES, FANOUT_BYTES, FANOUT_CLIENTS = 64 * MB, 64 * MB, 16
    STARTS, EXITS, PACED, RATE_STARTS, SCALE_JOBS, REPS, FANOUT_REPS = 100, 30, 20, 100, 100, 3, 1
    KEPT_JOBS = 1000
else:
    STREAM_BYTES, FANOUT_BYTES, FANOUT_CLIENTS = 1024 * MB, 256 * MB, 64
    STARTS, EXITS, PACED, RATE_STARTS, SCALE_JOBS, REPS, FANOUT_REPS = 300, 100, 60, 400, 1000, 5, 3
    KEPT_JOBS = 10_000
FANOUT_SMALL_BYTES = FANOUT_BYTES // 4    # the second output size, to see whether memory growth follows output size
START_ROUNDS = 10                          # start-latency samples are taken in this many interleaved rounds
PACE = 0.1                                 # idle seconds before each paced call (a client that is not in a loop)
WARMUP = 20                                # discarded calls on each channel before timing
FANOUT_PROCS = max(1, min(int(os.environ.get("BENCH_FANOUT_PROCS", "2")), FANOUT_CLIENTS))
RATE_THREADS = 8                           # client threads (each with its own channel) measuring the start rate
RATE_REPS = 3                              # interleaved runs of the start rate, each of RATE_STARTS per mode
RATE_SETTLE = 0.5                          # idle seconds after each run: what it leaves to do is not the next's cost
SCALE_THREADS = 8                          # client threads (each with its own channel) starting the scale jobs
SCALE_COMMAND = ["sleep", "60"]
RPC_TIMEOUT = 60.0
STREAM_TIMEOUT = 600.0

TARGETS = {  # name: threshold
    "stream_vs_ceiling_min": 0.7,
    "stream_vs_pipe_min": 0.21,               # and above the ssh level, put at this share of the pipe
    "start_paced_vs_query_plain_max": 2.0,    # a paced Start's p50 over a paced Query's, on the same server
    "start_paced_vs_query_isolated_max": 2.5,
    "start_rate_per_s_plain_min": 200.0,
    "start_rate_per_s_isolated_min": 150.0,
    "fanout_vs_stream_min": 0.8,
    "fanout_growth_mb_max": 100.0,
    "fanout_growth_size_slack_mb": 16.0,  # growth at the full output size may exceed that at a quarter by this much
    "scale_job_pss_mb_max": 4.0,
    "scale_server_rss_mb_max": 300.0,
    "kept_load_s_max": 2.0,  # how much longer a server takes to listen on 10,000 kept jobs than on none
}


class BenchError(Exception):
    """Something the bench checks went wrong (a wrong byte count, a job that did not run): the phase fails."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Statistics and /proc
# ---------------------------------------------------------------------------------------------------------------------

def percentile(values, p):
    """Linear interpolation between closest ranks, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return None
    k = (len(ordered) - 1) * p / 100.0
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def proc_status(pid):
    """{'VmRSS': kB, 'VmHWM': kB, 'Threads': n} of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM", "Threads") if key in fields}


def reset_hwm(pid):
    """Resets a process's VmHWM to its current RSS (Linux >= 4.0, needs root or the same user)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


children = jobworker.children_of


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def proc_stat(pid):
    """(state, start time in ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def alive(identity):
    """Whether (pid, start time) still names a live process (not a zombie, not a reused pid)."""
    pid, started = identity
    stat = proc_stat(pid)
    return stat is not None and stat[1] == started and stat[0] != "Z"


def identities(pids):
    result = []
    for pid in pids:
        stat = proc_stat(pid)
        if stat is not None:
            result.append((pid, stat[1]))
    return result


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def mem_available_kb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


class Monitor:
    """Peak memory and threads of every watched process, per phase.

    At a phase's start each process's VmHWM is reset (clear_refs), so the VmHWM read at its end is that phase's peak;
    a sampler thread also tracks RSS and thread count every 50 ms (the only source of a peak thread count, and the
    peak RSS where VmHWM cannot be reset).
    """

    def __init__(self):
        self.processes = {}   # name -> pid
        self.phases = []      # (phase, {name: record})
        self._current = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="monitor", daemon=True)
        self._thread.start()

    def watch(self, name, pid):
        self.processes[name] = pid

    def unwatch(self, name):
        self.processes.pop(name, None)

    def close(self):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(0.05):
            with self._lock:
                if self._current is None:
                    continue
                for name, record in self._current.items():
                    status = proc_status(record["pid"])
                    if status:
                        record["rss_max_kb"] = max(record["rss_max_kb"], status["VmRSS"])
                        record["threads_max"] = max(record["threads_max"], status["Threads"])

    @contextlib.contextmanager
    def phase(self, phase, names=None):
        records = {}
        for name in names or list(self.processes):
            pid = self.processes.get(name)
            status = proc_status(pid) if pid else None
            if status is None:
                continue
            reset = reset_hwm(pid)
            records[name] = {"pid": pid, "hwm_reset": reset, "rss_start_kb": status["VmRSS"],
                             "rss_max_kb": status["VmRSS"], "threads_start": status["Threads"],
                             "threads_max": status["Threads"]}
        with self._lock:
            self._current = records
        try:
            yield records
        finally:
            with self._lock:
                self._current = None
            for record in records.values():
                status = proc_status(record["pid"])
                if status:
                    record["rss_end_kb"] = status["VmRSS"]
                    record["rss_max_kb"] = max(record["rss_max_kb"], status["VmRSS"])
                    record["threads_end"] = status["Threads"]
                    record["threads_max"] = max(record["threads_max"], status["Threads"])
                    record["hwm_kb"] = status["VmHWM"] if record["hwm_reset"] else record["rss_max_kb"]
                else:  # it went away during the phase
                    record["hwm_kb"] = record["rss_max_kb"]
                    record["rss_end_kb"] = record["threads_end"] = None
            self.phases.append((phase, records))


# ---------------------------------------------------------------------------------------------------------------------
# Certificates and the processes the bench starts
# ---------------------------------------------------------------------------------------------------------------------

def make_certs(directory):
    """A CA, a server certificate (localhost, 127.0.0.1) and an admin client certificate, as the Makefile makes them."""
    def run(argv, **kwargs):
        subprocess.run(argv, check=True, stderr=subprocess.PIPE, **kwargs)

    def path(name):
        return os.path.join(directory, name)

    def key(name):
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", path(name + ".key")])
        os.chmod(path(name + ".key"), 0o600)

    def sign(name, subject, extensions):
        key(name)
        with open(path(name + ".ext"), "w") as f:
            f.write(extensions)
        csr = subprocess.run(["openssl", "req", "-new", "-key", path(name + ".key"), "-subj", subject],
                             check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout
        run(["openssl", "x509", "-req", "-sha256", "-days", "825", "-CA", path("ca.pem"), "-CAkey", path("ca.key"),
             "-set_serial", "0x" + secrets.token_hex(16), "-extfile", path(name + ".ext"), "-out", path(name + ".pem")],
            input=csr, stdout=subprocess.DEVNULL)
        os.unlink(path(name + ".ext"))

    key("ca")
    run(["openssl", "req", "-x509", "-new", "-sha256", "-days", "3650", "-key", path("ca.key"),
         "-subj", "/O=jobworker/CN=jobworker CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", path("ca.pem")])
    sign("server", "/O=jobworker/CN=localhost",
         "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
         "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    sign("admin", "/O=jobworker/OU=admin/CN=bench",
         "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    return {"ca": path("ca.pem"), "server_cert": path("server.pem"), "server_key": path("server.key"),
            "cert": path("admin.pem"), "key": path("admin.key")}


STALE_PREFIX = "jobworker-bench-"  # + the bench's pid: the name of its temporary directory


def remove_stale():
    """Removes the temporary directory of an earlier bench that was killed outright (SIGKILL), if any."""
    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith(STALE_PREFIX)]
    except OSError:
        return
    for name in names:
        try:
            pid = int(name[len(STALE_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not any(os.path.basename(__file__) in arg for arg in cmdline(pid)):  # that bench is no longer running
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


PR_SET_PDEATHSIG = 1

# Placed in front of `jobworker.py serve`: asks for SIGTERM should the bench die, so that the server shuts down
# cleanly (its jobs with it) even then, and becomes the server.
SERVER_WRAPPER = ("import ctypes, os, signal, sys\n"
                  f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM, 0, 0, 0)\n"
                  "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")


def die_with_parent():
    """The calling process is killed when the bench (the thread that started it) goes away."""
    import ctypes
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def read_line(process, timeout, what):
    """The first line a child writes on stdout, or BenchError if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    data = b""
    fd = process.stdout.fileno()
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{what} did not answer within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"{what} exited (status {process.wait()}) before answering")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


class ServerProcess:
    """A `jobworker.py serve` of the bench's own, on 127.0.0.1 with a free port."""

    def __init__(self, name, isolation, certs, workdir, program=JOBWORKER, options=()):
        self.name, self.isolation, self.certs, self.program, self.options = name, isolation, certs, program, options
        self.data_dir = os.path.join(workdir, f"{name}-data")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.process = None
        self.addr = None
        self.clients = []
        self.report = {}

    def start(self):
        argv = [sys.executable, "-c", SERVER_WRAPPER, self.program, "serve", "--addr", "127.0.0.1:0",
                "--cert", self.certs["server_cert"], "--key", self.certs["server_key"], "--ca", self.certs["ca"],
                "--data-dir", self.data_dir, "--isolation", self.isolation, *self.options]
        with open(self.log_path, "ab") as err:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                            start_new_session=True)  # a ^C to the bench is for the bench
        try:
            line = read_line(self.process, 60, f"server {self.name}")
        except BenchError as e:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its launcher (its own session)
            self.process.wait()
            raise BenchError(f"{e}; its log ends with:\n{self.log_tail()}") from None
        if not line.startswith("listening on port "):
            raise BenchError(f"server {self.name} said {line!r}")
        self.addr = f"127.0.0.1:{int(line.rsplit(' ', 1)[1])}"

    def client(self):
        client = jobworker.Client(self.addr, self.certs["cert"], self.certs["key"], self.certs["ca"])
        grpc.channel_ready_future(client.channel).result(timeout=RPC_TIMEOUT)
        self.clients.append(client)
        return client

    @property
    def pid(self):
        return self.process.pid

    def launcher_pid(self):
        for pid in children(self.pid):
            if any("jobworker_launcher" in arg for arg in cmdline(pid)):
                return pid
        return None

    def log_tail(self, lines=15):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        """SIGTERM, and a check that the server and every process it started are gone (SIGKILL after 60 s)."""
        if self.process is None or self.report:
            return self.report
        if self.process.poll() is not None:  # it has gone by itself
            self.report["exit_status"] = f"exited by itself with status {self.process.returncode}"
            self.report["log_tail"] = self.log_tail()
            return self.report
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.close()
        self.clients = []
        started = identities(descendants(self.pid))
        t0 = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(60)
            self.report["stop_s"] = time.monotonic() - t0
            self.report["exit_status"] = code
        except subprocess.TimeoutExpired:
            self.report["stop_s"] = None
            self.report["exit_status"] = "did not exit within 60 s of SIGTERM; killed"
            log(f"server {self.name} did not exit within 60 s of SIGTERM; killing it")
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        deadline = time.monotonic() + 10
        while any(alive(i) for i in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [i for i in started if alive(i)]
        for pid, _ in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.report["leftover_processes"] = len(left)
        if left:
            log(f"server {self.name}: {len(left)} of its processes outlived it; killed them")
        if self.process.stdout:
            self.process.stdout.close()
        return self.report


class Helper:
    """This script run again in a mode of its own (the ceiling server, a fan-out client): one line of output, then
    on request more. It ends when its stdin closes, and with the bench if that dies."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + [str(a) for a in args],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def line(self, timeout, what):
        return read_line(self.process, timeout, what)

    def send(self, text):
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def rest(self, timeout):
        """Everything else it writes, once it has exited."""
        out, _ = self.process.communicate(timeout=timeout)
        return out.decode()

    def close(self):
        if self.process.returncode is None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()


# ---------------------------------------------------------------------------------------------------------------------
# The ceiling: a bare gRPC server-streaming RPC
# ---------------------------------------------------------------------------------------------------------------------

CEILING_METHOD = "/bench.Ceiling/Stream"


def ceiling_server_main(cert_dir):
    """Serves one method that streams as many bytes as asked, in pre-built messages of STREAM_CHUNK bytes.

    For the fairest comparison the messages are the service's own type, pb.StreamResponse with data of STREAM_CHUNK
    bytes (and a last one with a status), serialized by gRPC with the same protobuf code; the request is the byte
    count as text, with identity (de)serialization. Same credentials (mutual TLS, client certificate required) and
    message-size and port options as the service; not its keepalive (it never fires in a stream this short) nor its
    elastic thread pool (a stream holds one thread in either). Nothing else is in the path: no job, no file, no
    authorization.
    """
    from concurrent import futures
    die_with_parent()
    certs = {name: os.path.join(cert_dir, name) for name in ("server.pem", "server.key", "ca.pem")}
    message = pb.StreamResponse(source=pb.StreamResponse.STDOUT, data=bytes(CHUNK), offset=0)

    def stream(request, context):
        total = int(request.decode())
        sent = 0
        while sent + CHUNK <= total:
            message.offset = sent  # gRPC serializes each message before asking for the next
            yield message
            sent += CHUNK
        if sent < total:
            yield pb.StreamResponse(data=bytes(total - sent), offset=sent)
        yield pb.StreamResponse(offset=total, status=pb.JobStatus(state=pb.EXITED, exit_code=0))

    handler = grpc.method_handlers_generic_handler("bench.Ceiling", {
        "Stream": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=None, response_serializer=pb.StreamResponse.SerializeToString)})
    options = [("grpc.max_receive_message_length", jobworker.MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="rpc"), options=options,
                         maximum_concurrent_rpcs=256)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", jobworker.server_credentials(
        certs["server.pem"], certs["server.key"], certs["ca.pem"]))
    server.start()
    print(f"listening on port {port}", flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    server.stop(0).wait()
    return 0


def ceiling_call(channel):
    return channel.unary_stream(CEILING_METHOD, request_serializer=None, _registered_method=True,  # as the stubs do
                                response_deserializer=pb.StreamResponse.FromString)


# ---------------------------------------------------------------------------------------------------------------------
# Fan-out clients, a few per process
# ---------------------------------------------------------------------------------------------------------------------

def receive(call, expected):
    """Reads a stream to its end: (bytes, whether it ended with exit 0 and every byte in order, a problem or None)."""
    return receive_status(call, expected)[:3]


def receive_status(call, expected):
    """receive(), and the job's final status (or None)."""
    received = 0
    status = None
    for message in call:
        if message.data:
            if message.offset != received:
                call.cancel()
                return received, False, f"offset {message.offset} where {received} was expected", None
            received += len(message.data)
        if message.HasField("status"):
            status = message.status
    if status is None:
        return received, False, "the stream ended without a status", None
    if status.state != pb.EXITED or status.exit_code != 0:
        return received, False, f"the job ended {pb.JobState.Name(status.state)}, exit {status.exit_code}", status
    if received != expected:
        return received, False, f"{received} bytes, {expected} expected", status
    return received, True, None, status


def fanout_worker_main(addr, cert_dir, count, expected):
    """`count` clients, each with a channel of its own, connect; on a job id from stdin they all stream it."""
    die_with_parent()
    count, expected = int(count), int(expected)
    paths = [os.path.join(cert_dir, n) for n in ("admin.pem", "admin.key", "ca.pem")]
    clients = [jobworker.Client(addr, *paths) for _ in range(count)]
    for client in clients:
        grpc.channel_ready_future(client.channel).result(timeout=RPC_TIMEOUT)
    print("ready", flush=True)
    job_id = sys.stdin.readline().strip()
    if not job_id:
        return 0
    results = [None] * count
    barrier = threading.Barrier(count)

    def run(index):
        barrier.wait()
        t0 = time.monotonic()
        try:
            call = clients[index].stub.Stream(pb.StreamRequest(job_id=job_id), timeout=STREAM_TIMEOUT)
            received, ok, problem = receive(call, expected)
        except grpc.RpcError as e:
            received, ok, problem = 0, False, f"{e.code().name}: {e.details()}"
        results[index] = {"bytes": received, "ok": ok, "problem": problem, "t0": t0, "t1": time.monotonic()}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results), flush=True)
    for client in clients:
        client.close()
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------------------

def start_job(client, command):
    return client.stub.Start(pb.StartRequest(command=command), timeout=RPC_TIMEOUT).job_id


def run_to_end(client):
    """Starts `true` and streams it to its end: its job id, or BenchError unless it exited 0."""
    job_id = start_job(client, ["true"])
    _, ok, problem = receive(client.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=RPC_TIMEOUT), 0)
    if not ok:
        raise BenchError(f"start-to-exit: {problem}")
    return job_id


def start_latency_phase(results, iso, plain):
    """Spawn, Start (isolation off and on), Start-to-exit and paced Starts and Queries, interleaved in rounds on warm
    channels."""
    clients = {"plain": plain.client(), "isolated": iso.client()}
    for client in clients.values():
        for _ in range(WARMUP):
            start_job(client, ["true"])
    ended = {mode: run_to_end(client) for mode, client in clients.items()}  # the job the paced Queries ask about
    for mode, client in clients.items():
        for _ in range(WARMUP):
            client.stub.Query(pb.QueryRequest(job_id=ended[mode]), timeout=RPC_TIMEOUT)
    for _ in range(WARMUP):
        subprocess.Popen(["/bin/true"]).wait()
        subprocess.run(["/bin/true"])
    starts = {"plain": [], "isolated": []}
    paced = {mode: {"start": [], "query": []} for mode in clients}
    exits = {"plain": [], "isolated": []}
    spawn_samples, spawn_run = [], []

    def paced_calls(mode):
        client, job_id = clients[mode], ended[mode]
        return {"start": lambda: start_job(client, ["true"]),
                "query": lambda: client.stub.Query(pb.QueryRequest(job_id=job_id), timeout=RPC_TIMEOUT)}

    for round_ in range(START_ROUNDS):
        per_round = STARTS // START_ROUNDS + (1 if round_ < STARTS % START_ROUNDS else 0)
        exits_per_round = EXITS // START_ROUNDS + (1 if round_ < EXITS % START_ROUNDS else 0)
        paced_per_round = PACED // START_ROUNDS + (1 if round_ < PACED % START_ROUNDS else 0)
        modes = ["plain", "isolated"] if round_ % 2 == 0 else ["isolated", "plain"]
        for _ in range(per_round):
            t0 = time.perf_counter()
            child = subprocess.Popen(["/bin/true"])   # returns once the child has exec'd: what Start answers
            spawn_samples.append(time.perf_counter() - t0)
            child.wait()
            t0 = time.perf_counter()
            subprocess.run(["/bin/true"])             # spawn, exit and reap: what start-to-exit covers
            spawn_run.append(time.perf_counter() - t0)
        for mode in modes:
            for _ in range(per_round):
                t0 = time.perf_counter()
                start_job(clients[mode], ["true"])
                starts[mode].append(time.perf_counter() - t0)
        for mode in modes:
            for _ in range(exits_per_round):
                t0 = time.perf_counter()
                run_to_end(clients[mode])
                exits[mode].append(time.perf_counter() - t0)
        for mode in modes:
            calls = paced_calls(mode)
            for i in range(paced_per_round):
                # Start and Query take turns at going first, so that neither is always the one after the other
                for kind in ("start", "query") if i % 2 == 0 else ("query", "start"):
                    time.sleep(PACE)
                    t0 = time.perf_counter()
                    calls[kind]()
                    paced[mode][kind].append(time.perf_counter() - t0)
    ms = 1000.0
    results["spawn_p50_ms"] = percentile(spawn_samples, 50) * ms
    results["spawn_p99_ms"] = percentile(spawn_samples, 99) * ms
    results["spawn_exit_p50_ms"] = percentile(spawn_run, 50) * ms
    results["spawn_exit_p99_ms"] = percentile(spawn_run, 99) * ms
    results["spawn_samples"] = len(spawn_samples)
    results["pace_ms"] = PACE * ms
    for mode in ("plain", "isolated"):
        results[f"start_p50_ms_{mode}"] = percentile(starts[mode], 50) * ms
        results[f"start_p99_ms_{mode}"] = percentile(starts[mode], 99) * ms
        results[f"start_samples_{mode}"] = len(starts[mode])
        results[f"exit_p50_ms_{mode}"] = percentile(exits[mode], 50) * ms
        results[f"exit_p99_ms_{mode}"] = percentile(exits[mode], 99) * ms
        results[f"exit_samples_{mode}"] = len(exits[mode])
        for kind in ("start", "query"):
            results[f"{kind}_paced_p50_ms_{mode}"] = percentile(paced[mode][kind], 50) * ms
            results[f"{kind}_paced_p99_ms_{mode}"] = percentile(paced[mode][kind], 99) * ms
        results[f"paced_samples_{mode}"] = len(paced[mode]["start"])
    queries = paced["plain"]["query"] + paced["isolated"]["query"]  # the same call in either mode
    results["query_paced_p50_ms"] = percentile(queries, 50) * ms
    results["query_paced_p99_ms"] = percentile(queries, 99) * ms


def wait_ended(client, job_ids, timeout=30.0):
    """Waits for jobs of `true` to end: BenchError unless every one has exited 0 within timeout."""
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        while (status := client.stub.Query(pb.QueryRequest(job_id=job_id), timeout=RPC_TIMEOUT)).state == pb.RUNNING:
            if time.monotonic() > deadline:
                raise BenchError(f"job {job_id} (`true`) still running {timeout:.0f} s later")
            time.sleep(0.01)
        if status.state != pb.EXITED or status.exit_code != 0:
            raise BenchError(f"job {job_id} (`true`) ended {pb.JobState.Name(status.state)}, exit {status.exit_code}")


def start_rate_phase(results, iso, plain):
    """Starts of `true` per second, RATE_STARTS back to back from RATE_THREADS client threads, isolation off and on,
    and Python's own spawn of /bin/true from as many threads; RATE_REPS interleaved runs, medians."""
    clients = {"plain": [plain.client() for _ in range(RATE_THREADS)],
               "isolated": [iso.client() for _ in range(RATE_THREADS)]}
    for client in clients["plain"] + clients["isolated"]:
        for _ in range(3):
            start_job(client, ["true"])
    workers = {"spawn": [lambda: subprocess.run(["/bin/true"], check=True)] * RATE_THREADS,
               **{mode: [lambda c=c: start_job(c, ["true"]) for c in clients[mode]] for mode in clients}}
    names = list(workers)
    rates = {name: [] for name in names}
    for rep in range(RATE_REPS):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate, so no one always runs first
            seconds, job_ids, errors = in_threads(RATE_STARTS, workers[name])
            if len(job_ids) != RATE_STARTS:
                raise BenchError(f"start rate, {name}: {RATE_STARTS - len(job_ids)} of {RATE_STARTS} failed"
                                 + (f", the first {errors[0]}" if errors else ""))
            rates[name].append(RATE_STARTS / seconds)
            if name in clients:  # its jobs end before the next run, which must not find them still running
                wait_ended(clients[name][0], job_ids)
            log(f"  rep {rep + 1}/{RATE_REPS} {name}: {rates[name][-1]:.0f}/s")
            time.sleep(RATE_SETTLE)
    results["spawn_rate_per_s"] = median(rates["spawn"])
    for mode in clients:
        results[f"start_rate_per_s_{mode}"] = median(rates[mode])
        results[f"start_rate_per_s_{mode}_runs"] = [round(v, 1) for v in rates[mode]]
    results["spawn_rate_per_s_runs"] = [round(v, 1) for v in rates["spawn"]]
    results["start_rate_starts"] = RATE_STARTS
    results["start_rate_threads"] = RATE_THREADS


def throughput_phase(results, server, ceiling_addr, certs):
    """Pipe, ceiling, one API stream and one CLI stream of STREAM_BYTES each, interleaved, REPS times; medians."""
    client = server.client()
    ceiling_client = jobworker.Client(ceiling_addr, certs["cert"], certs["key"], certs["ca"])
    grpc.channel_ready_future(ceiling_client.channel).result(timeout=RPC_TIMEOUT)
    ceiling = ceiling_call(ceiling_client.channel)
    request = str(STREAM_BYTES).encode()
    # warm both paths (connection, first messages)
    receive(ceiling(str(8 * CHUNK).encode(), timeout=RPC_TIMEOUT), 8 * CHUNK)
    job_id = start_job(client, ["head", "-c", str(8 * CHUNK), "/dev/zero"])
    receive(client.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=RPC_TIMEOUT), 8 * CHUNK)

    def pipe():
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", f"head -c {STREAM_BYTES} /dev/zero | cat > /dev/null"], check=True)
        return STREAM_BYTES / (time.perf_counter() - t0) / MB

    def ceiling_stream():
        t0 = time.perf_counter()
        received, ok, problem = receive(ceiling(request, timeout=STREAM_TIMEOUT), STREAM_BYTES)
        elapsed = time.perf_counter() - t0
        if not ok:
            raise BenchError(f"ceiling: {problem}")
        return received / elapsed / MB

    finished = []  # jobs whose whole output is on the server: to stream again

    def api_stream():
        job_id = start_job(client, ["head", "-c", str(STREAM_BYTES), "/dev/zero"])
        t0 = time.perf_counter()
        received, ok, problem, status = receive_status(
            client.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=STREAM_TIMEOUT), STREAM_BYTES)
        elapsed = time.perf_counter() - t0
        if not ok:
            raise BenchError(f"API stream: {problem}")
        # how fast the server took the output in: the job cannot end before its last byte is in the log
        ran = (status.ended_at.ToNanoseconds() - status.started_at.ToNanoseconds()) / 1e9
        samples["capture"].append(STREAM_BYTES / ran / MB if ran > 0 else None)
        finished.append(job_id)
        return received / elapsed / MB

    def replay_stream():
        """The same through the API, from a job that has ended: its output is all in the log already."""
        job_id = finished.pop(0)
        t0 = time.perf_counter()
        received, ok, problem = receive(client.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=STREAM_TIMEOUT),
                                        STREAM_BYTES)
        elapsed = time.perf_counter() - t0
        if not ok:
            raise BenchError(f"replayed stream: {problem}")
        return received / elapsed / MB

    def cli_stream():
        job_id = start_job(client, ["head", "-c", str(STREAM_BYTES), "/dev/zero"])
        argv = [sys.executable, JOBWORKER, "stream", "--addr", server.addr, "--cert", certs["cert"],
                "--key", certs["key"], "--ca", certs["ca"], job_id]
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as null:
            code = subprocess.run(argv, stdout=null, stderr=subprocess.PIPE, timeout=STREAM_TIMEOUT)
        elapsed = time.perf_counter() - t0
        if code.returncode != 0:
            raise BenchError(f"CLI stream exited {code.returncode}: {code.stderr.decode(errors='replace')[-300:]}")
        status = client.stub.Query(pb.QueryRequest(job_id=job_id), timeout=RPC_TIMEOUT)
        if status.output_bytes != STREAM_BYTES:
            raise BenchError(f"CLI stream: the job wrote {status.output_bytes} bytes, not {STREAM_BYTES}")
        return STREAM_BYTES / elapsed / MB

    runs = [("pipe", pipe), ("ceiling", ceiling_stream), ("stream", api_stream), ("cli_stream", cli_stream)]
    samples = {name: [] for name, _ in runs}
    samples["capture"], samples["stream_replay"] = [], []
    for rep in range(REPS):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]  # rotate, so no one always runs first
        for name, run in order:
            # Each run starts with the page cache clean: the service keeps every byte on disk, and the gigabytes
            # earlier runs left dirty would otherwise make this one wait on their writeback.
            os.sync()
            samples[name].append(run())
            log(f"  rep {rep + 1}/{REPS} {name}: {samples[name][-1]:.0f} MB/s")
            if name == "stream":  # right after it: the same job's output again, now that it has all been written
                samples["stream_replay"].append(replay_stream())
                log(f"  rep {rep + 1}/{REPS} stream_replay: {samples['stream_replay'][-1]:.0f} MB/s")
    for name, values in samples.items():
        results[f"{name}_mbps"] = median(values)
        results[f"{name}_mbps_runs"] = [None if v is None else round(v, 1) for v in values]
    ceiling_client.close()


def fanout_once(server, client, nbytes):
    """FANOUT_CLIENTS clients (in FANOUT_PROCS processes, connected beforehand) stream one job of nbytes at once."""
    per_proc = [FANOUT_CLIENTS // FANOUT_PROCS + (1 if i < FANOUT_CLIENTS % FANOUT_PROCS else 0)
                for i in range(FANOUT_PROCS)]
    workers = [Helper("--fanout-worker", server.addr, os.path.dirname(server.certs["cert"]), n, nbytes)
               for n in per_proc if n]
    try:
        for worker in workers:
            if worker.line(120, "a fan-out client process") != "ready":
                raise BenchError("a fan-out client process did not get ready")
        job_id = start_job(client, ["head", "-c", str(nbytes), "/dev/zero"])
        for worker in workers:
            worker.send(job_id)
        outcomes = []
        for worker in workers:
            outcomes += json.loads(worker.rest(STREAM_TIMEOUT + 60).strip().splitlines()[-1])
    finally:
        for worker in workers:
            worker.close()
    t0 = min(o["t0"] for o in outcomes)
    t1 = max(o["t1"] for o in outcomes)
    total = sum(o["bytes"] for o in outcomes)
    bad = [o for o in outcomes if not o["ok"] or o["bytes"] != nbytes]
    per_client = [o["bytes"] / max(o["t1"] - o["t0"], 1e-9) / MB for o in outcomes]
    return {"mbps": total / (t1 - t0) / MB, "clients": len(outcomes), "clients_ok": len(outcomes) - len(bad),
            "problem": bad[0]["problem"] if bad else None, "client_min_mbps": min(per_client),
            "client_max_mbps": max(per_client), "seconds": t1 - t0}


def fanout_phase(results, monitor, server):
    """Full and quarter output sizes, interleaved, FANOUT_REPS times: throughput and the server's memory growth.

    Growth is each run's peak (VmHWM) over the server's RSS before the first fan-out; a small untimed run first
    makes every measured run find the server equally warm (thread pool grown, allocator arenas made).
    """
    client = server.client()
    base_kb = proc_status(server.pid)["VmRSS"]
    with monitor.phase(f"fan-out warm-up {FANOUT_CLIENTS}x{FANOUT_SMALL_BYTES // 4 // MB}MB", [server.name]):
        fanout_once(server, client, FANOUT_SMALL_BYTES // 4)
    full, small = [], []
    growth = {"full": [], "small": []}
    for rep in range(FANOUT_REPS):
        for size_name, nbytes in (("small", FANOUT_SMALL_BYTES), ("full", FANOUT_BYTES)):
            with monitor.phase(f"fan-out {FANOUT_CLIENTS}x{nbytes // MB}MB #{rep + 1}", [server.name]) as records:
                outcome = fanout_once(server, client, nbytes)
            record = records.get(server.name)
            if record:
                growth[size_name].append((record["hwm_kb"] - base_kb) / 1024)
                outcome["threads_max"] = record["threads_max"]
            (full if size_name == "full" else small).append(outcome)
            log(f"  rep {rep + 1}/{FANOUT_REPS} fan-out {nbytes // MB} MB x {FANOUT_CLIENTS}: "
                f"{outcome['mbps']:.0f} MB/s, {outcome['clients_ok']}/{outcome['clients']} clients ok, "
                f"server peak {growth[size_name][-1] if growth[size_name] else float('nan'):.1f} MB over idle")
    results["fanout_mbps"] = median(o["mbps"] for o in full)
    results["fanout_mbps_runs"] = [round(o["mbps"], 1) for o in full]
    results["fanout_small_mbps"] = median(o["mbps"] for o in small)
    results["fanout_clients"] = FANOUT_CLIENTS
    results["fanout_client_processes"] = FANOUT_PROCS
    results["fanout_bytes"] = FANOUT_BYTES
    results["fanout_small_bytes"] = FANOUT_SMALL_BYTES
    results["fanout_clients_ok"] = min(o["clients_ok"] for o in full + small)
    results["fanout_all_bytes_ok"] = all(o["clients_ok"] == o["clients"] == FANOUT_CLIENTS for o in full + small)
    results["fanout_client_min_mbps"] = min(o["client_min_mbps"] for o in full)
    results["fanout_client_max_mbps"] = max(o["client_max_mbps"] for o in full)
    results["fanout_server_threads_max"] = max((o.get("threads_max") or 0) for o in full + small)
    results["fanout_server_idle_rss_mb"] = base_kb / 1024
    results["fanout_server_growth_mb"] = median(growth["full"])
    results["fanout_server_growth_max_mb"] = max(growth["full"]) if growth["full"] else None
    results["fanout_server_growth_small_mb"] = median(growth["small"])
    problems = [o["problem"] for o in full + small if o["problem"]]
    if problems:
        results["fanout_problem"] = problems[0]


def list_all(client):
    """Every job the client may see, page after page (of 1000, the most a page holds)."""
    jobs, token = [], ""
    while True:
        page = client.stub.List(pb.ListRequest(page_size=1000, page_token=token), timeout=RPC_TIMEOUT)
        jobs += page.jobs
        if not (token := page.next_page_token):
            return jobs


def scale_phase(results, monitor, server):
    """SCALE_JOBS `sleep 60` jobs at once: start time, all running, per-job PSS, server memory; then stop them all."""
    clients = [server.client() for _ in range(SCALE_THREADS)]
    for client in clients:
        for _ in range(3):
            start_job(client, ["true"])
    time.sleep(0.5)
    base_status = proc_status(server.pid)
    available_before = mem_available_kb()
    starters = [lambda c=c: start_job(c, SCALE_COMMAND) for c in clients]
    with monitor.phase(f"scale: start {SCALE_JOBS} jobs", [server.name]):
        results["scale_start_s"], job_ids, errors = in_threads(SCALE_JOBS, starters)
    results["scale_start_errors"] = len(errors)
    if errors:
        results["scale_start_error"] = errors[0]
    results["scale_starts_per_s"] = len(job_ids) / results["scale_start_s"]

    with monitor.phase(f"scale: {len(job_ids)} jobs running", [server.name]):
        t0 = time.perf_counter()
        listing = list_all(clients[0])
        results["scale_list_ms"] = (time.perf_counter() - t0) * 1000
        ours = set(job_ids)
        running = [s for s in listing if s.job_id in ours and s.state == pb.RUNNING]
        results["scale_jobs_requested"] = SCALE_JOBS
        results["scale_jobs"] = len(running)
        time.sleep(1.0)  # let the host settle before reading memory
        status = proc_status(server.pid)
        results["scale_server_rss_mb"] = status["VmRSS"] / 1024
        results["scale_server_growth_mb"] = (status["VmRSS"] - base_status["VmRSS"]) / 1024
        results["scale_server_threads"] = status["Threads"]
        results["scale_host_mem_per_job_mb"] = (available_before - mem_available_kb()) / 1024 / max(len(running), 1)
        # Every job is an init (a child of the launcher, the server's zygote) and what runs under it: the command.
        launcher = server.launcher_pid()
        commands = {job.pid for job in running}
        init_pss, command_pss, job_pss, unmatched = [], [], [], 0
        for init in children(launcher) if launcher else []:
            processes = [init] + descendants(init)
            values = [pss_kb(p) for p in processes]
            if any(v is None for v in values) or not commands & set(processes[1:]):
                unmatched += 1  # gone meanwhile, not one of our jobs, or an init kept ready for the next Start
                continue
            init_pss.append(values[0])
            command_pss.append(sum(values[1:]))
            job_pss.append(sum(values))
        results["scale_jobs_measured"] = len(job_pss)
        results["scale_inits_unmatched"] = unmatched
        results["scale_job_pss_mb"] = statistics.mean(job_pss) / 1024 if job_pss else None
        results["scale_init_pss_mb"] = statistics.mean(init_pss) / 1024 if init_pss else None
        results["scale_command_pss_mb"] = statistics.mean(command_pss) / 1024 if command_pss else None
        results["scale_launcher_pss_mb"] = (pss_kb(launcher) or 0) / 1024 if launcher else None
        results["scale_server_pss_mb"] = (pss_kb(server.pid) or 0) / 1024
        # still all running after the measurement?
        listing = list_all(clients[0])
        results["scale_jobs_after"] = sum(1 for s in listing if s.job_id in ours and s.state == pb.RUNNING)

    command_pids = identities(job.pid for job in running)
    pending = list(job_ids)

    def stop_one(client):  # list.pop is atomic: each call stops a job of its own
        return client.stub.Stop(pb.StopRequest(job_id=pending.pop(), force=True), timeout=RPC_TIMEOUT).state

    stoppers = [lambda c=c: stop_one(c) for c in clients]
    with monitor.phase(f"scale: stop {len(job_ids)} jobs", [server.name]):
        results["scale_stop_s"], stopped, stop_errors = in_threads(len(job_ids), stoppers)
    results["scale_stop_errors"] = len(stop_errors)
    results["scale_stopped"] = sum(1 for s in stopped if s == pb.STOPPED)
    deadline = time.monotonic() + 10
    while any(alive(i) for i in command_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher = server.launcher_pid()
    # Inits still under the launcher with something under them are leftovers; inits with nothing under them are the
    # few the server keeps ready for the next Starts (jobworker.InitPool.SIZE), not jobs.
    live_inits = [p for p in children(launcher) if (stat := proc_stat(p)) and stat[0] != "Z"] if launcher else []
    busy_inits = sum(1 for p in live_inits if descendants(p))
    results["scale_ready_inits"] = len(live_inits) - busy_inits
    results["scale_processes_left"] = sum(1 for i in command_pids if alive(i)) + busy_inits
    if errors or stop_errors:
        log(f"  scale: {len(errors)} start errors, {len(stop_errors)} stop errors: {(errors + stop_errors)[0]}")


def kept_phase(results, certs, workdir):
    """A server's start, to its `listening` line, on an empty data directory and on one of KEPT_JOBS ended jobs (one
    real job's directory, copied under new ids), interleaved REPS times: the medians, and the difference."""
    seed = ServerProcess("kept-seed", "off", certs, workdir)
    seed.start()
    try:
        client = seed.client()
        seed_id = start_job(client, ["echo", "kept"])
        wait_ended(client, [seed_id])
    finally:
        seed.stop()
    # A ServerProcess starts once; each repetition makes another, over the same data directory.
    servers = {"empty": lambda: ServerProcess("kept-empty", "on", certs, workdir),
               "kept": lambda: ServerProcess("kept", "on", certs, workdir, options=("--keep-jobs", str(KEPT_JOBS)))}
    seed_dir = os.path.join(seed.data_dir, "jobs", seed_id)
    kept_jobs_dir = os.path.join(servers["kept"]().data_dir, "jobs")
    with open(os.path.join(seed_dir, "record.json")) as f:
        record = json.load(f)
    for i in range(KEPT_JOBS):
        job_id = str(uuid.uuid4())
        shutil.copytree(seed_dir, os.path.join(kept_jobs_dir, job_id))
        with open(os.path.join(kept_jobs_dir, job_id, "record.json"), "w") as f:
            json.dump(dict(record, job_id=job_id, started_at=record["started_at"] + i / 1000,
                           ended_at=record["ended_at"] + i / 1000), f)
    times = {"empty": [], "kept": []}
    for _ in range(REPS):
        for kind, make in servers.items():
            server = make()
            if kind == "empty":  # as the first start on a host finds it
                shutil.rmtree(server.data_dir, ignore_errors=True)
            try:
                t0 = time.perf_counter()
                server.start()
                times[kind].append(time.perf_counter() - t0)
                listed = len(list_all(server.client()))
            finally:
                report = server.stop()
            if listed != (0 if kind == "empty" else KEPT_JOBS) or report.get("leftover_processes"):
                raise BenchError(f"a server on {kind} data listed {listed} jobs and stopped: {report}")
    results["kept_jobs"] = KEPT_JOBS
    results["kept_start_s_empty"], results["kept_start_s"] = median(times["empty"]), median(times["kept"])
    results["kept_load_s"] = results["kept_start_s"] - results["kept_start_s_empty"]


def in_threads(count, calls):
    """Makes `count` calls in all, back to back, each thread (one per function in calls) calling its own: the seconds
    until all are done, what the calls returned, and a description of each that raised."""
    lock = threading.Lock()
    todo = iter(range(count))
    returned, errors = [], []

    def loop(call):
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            try:
                value = call()
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{e.code().name}: {e.details()}")
            except (OSError, subprocess.SubprocessError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            else:
                with lock:
                    returned.append(value)

    return on_every_client(loop, calls), returned, errors


def on_every_client(work, clients):
    """Runs work(client) in a thread per client; returns the seconds until all are done."""
    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0


def sleep_pss_baseline():
    """PSS of a plain `sleep 60` started by Python's subprocess: what a process costs without the service."""
    child = subprocess.Popen(SCALE_COMMAND)
    try:
        time.sleep(0.3)
        return (pss_kb(child.pid) or 0) / 1024
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------

def evaluate(r):
    t = TARGETS
    checks = []

    def check(key, label, ok, shown):
        checks.append((key, label, ok, shown))
        r[key] = ok

    def fmt(value, spec=".2f", unit=""):
        return "n/a" if value is None else f"{value:{spec}}{unit}"

    check("target_stream_vs_ceiling", f"one stream >= {t['stream_vs_ceiling_min']} x ceiling",
          None if r.get("stream_vs_ceiling") is None else r["stream_vs_ceiling"] >= t["stream_vs_ceiling_min"],
          fmt(r.get("stream_vs_ceiling"), ".2f", " x"))
    check("target_stream_vs_pipe", f"one stream >= {t['stream_vs_pipe_min']} x pipe (the ssh level)",
          None if r.get("stream_vs_pipe") is None else r["stream_vs_pipe"] >= t["stream_vs_pipe_min"],
          fmt(r.get("stream_vs_pipe"), ".2f", " x"))
    for mode, switch in (("plain", "off"), ("isolated", "on")):
        limit, value = t[f"start_paced_vs_query_{mode}_max"], r.get(f"start_paced_vs_query_{mode}")
        check(f"target_start_paced_vs_query_{mode}", f"paced Start <= {limit:g} x paced Query, isolation {switch}",
              None if value is None else value <= limit,
              f"{fmt(value, '.2f', ' x')} ({fmt(r.get(f'start_paced_p50_ms_{mode}'))} / "
              f"{fmt(r.get(f'query_paced_p50_ms_{mode}'))} ms, p50)")
    for mode, switch in (("plain", "off"), ("isolated", "on")):
        limit, value = t[f"start_rate_per_s_{mode}_min"], r.get(f"start_rate_per_s_{mode}")
        check(f"target_start_rate_{mode}", f"Starts/s from {RATE_THREADS} threads >= {limit:g}, isolation {switch}",
              None if value is None else value >= limit, fmt(value, ".0f", " /s"))
    check("target_fanout_vs_stream", f"fan-out aggregate >= {t['fanout_vs_stream_min']} x one stream",
          None if r.get("fanout_vs_stream") is None else r["fanout_vs_stream"] >= t["fanout_vs_stream_min"],
          fmt(r.get("fanout_vs_stream"), ".2f", " x"))
    check("target_fanout_all_bytes", "fan-out: every client received every byte",
          r.get("fanout_all_bytes_ok"), f"{r.get('fanout_clients_ok', 'n/a')}/{r.get('fanout_clients', 'n/a')} clients")
    growth, small = r.get("fanout_server_growth_mb"), r.get("fanout_server_growth_small_mb")
    check("target_fanout_memory", f"fan-out server memory growth < {t['fanout_growth_mb_max']:g} MB",
          None if growth is None else growth < t["fanout_growth_mb_max"], fmt(growth, ".1f", " MB"))
    check("target_fanout_memory_flat", "fan-out memory growth independent of output size",
          None if growth is None or small is None else growth <= small + t["fanout_growth_size_slack_mb"],
          f"{fmt(small, '.1f')} MB at {FANOUT_SMALL_BYTES // MB} MB, {fmt(growth, '.1f')} MB at "
          f"{FANOUT_BYTES // MB} MB")
    jobs = r.get("scale_jobs")
    check("target_scale_all_running", f"scale: all {SCALE_JOBS} jobs run at once",
          None if jobs is None else jobs == SCALE_JOBS and r.get("scale_jobs_after") == SCALE_JOBS,
          f"{fmt(jobs, 'd')} running, {fmt(r.get('scale_jobs_after'), 'd')} after measuring")
    check("target_scale_job_pss", f"scale: each job <= {t['scale_job_pss_mb_max']:g} MB PSS",
          None if r.get("scale_job_pss_mb") is None else r["scale_job_pss_mb"] <= t["scale_job_pss_mb_max"],
          fmt(r.get("scale_job_pss_mb"), ".2f", " MB"))
    check("target_scale_server_rss", f"scale: server memory < {t['scale_server_rss_mb_max']:g} MB",
          None if r.get("scale_server_rss_mb") is None else r["scale_server_rss_mb"] < t["scale_server_rss_mb_max"],
          fmt(r.get("scale_server_rss_mb"), ".1f", " MB"))
    check("target_kept_load", f"start on {KEPT_JOBS:,} kept jobs <= {t['kept_load_s_max']:g} s more than on none",
          None if r.get("kept_load_s") is None else r["kept_load_s"] <= t["kept_load_s_max"],
          fmt(r.get("kept_load_s"), ".2f", " s"))
    r["targets_passed"] = sum(1 for c in checks if c[2])
    r["targets_total"] = len(checks)
    r["all_targets_pass"] = all(c[2] for c in checks)
    return checks


def add_ratios(r):
    def put(key, a, b):
        r[key] = ratio(r.get(a), r.get(b))

    put("ceiling_vs_pipe", "ceiling_mbps", "pipe_mbps")
    put("stream_vs_ceiling", "stream_mbps", "ceiling_mbps")
    put("stream_vs_pipe", "stream_mbps", "pipe_mbps")
    put("cli_stream_vs_ceiling", "cli_stream_mbps", "ceiling_mbps")
    put("cli_stream_vs_stream", "cli_stream_mbps", "stream_mbps")
    put("stream_replay_vs_ceiling", "stream_replay_mbps", "ceiling_mbps")
    put("capture_vs_pipe", "capture_mbps", "pipe_mbps")
    put("fanout_vs_stream", "fanout_mbps", "stream_mbps")
    put("fanout_vs_ceiling", "fanout_mbps", "ceiling_mbps")
    for mode in ("plain", "isolated"):
        put(f"start_p50_{mode}_vs_spawn", f"start_p50_ms_{mode}", "spawn_p50_ms")
        put(f"start_p99_{mode}_vs_spawn", f"start_p99_ms_{mode}", "spawn_p99_ms")
        put(f"exit_p50_{mode}_vs_spawn", f"exit_p50_ms_{mode}", "spawn_exit_p50_ms")
        put(f"exit_p99_{mode}_vs_spawn", f"exit_p99_ms_{mode}", "spawn_exit_p99_ms")
        put(f"start_paced_p50_{mode}_vs_spawn", f"start_paced_p50_ms_{mode}", "spawn_p50_ms")
        put(f"start_paced_vs_query_{mode}", f"start_paced_p50_ms_{mode}", f"query_paced_p50_ms_{mode}")
        put(f"start_rate_{mode}_vs_spawn", f"start_rate_per_s_{mode}", "spawn_rate_per_s")
    put("start_p50_isolated_vs_plain", "start_p50_ms_isolated", "start_p50_ms_plain")
    put("scale_job_pss_vs_plain_process", "scale_job_pss_mb", "sleep_pss_mb")
    put("scale_start_ms_per_job_vs_spawn", "scale_start_ms_per_job", "spawn_p50_ms")


def print_table(r, checks, monitor):
    def fmt(value, spec=".1f"):
        if value is None:
            return "n/a"
        return f"{value:{spec}}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    rows = []

    def section(title):
        rows.append(None)
        rows.append((title, "", "", ""))

    def row(label, value, unit="", base=None, spec=".1f"):
        rows.append(("  " + label, fmt(value, spec), unit, "" if base is None else base))

    mode = "QUICK" if QUICK else "full"
    print(f"\njobworker benchmark ({mode} run, {r['duration_s']:.0f} s; MB = 2^20 bytes; medians of interleaved "
          f"repetitions)")
    print(f"jobworker.py {r.get('jobworker_sha256')} (git {r.get('git_commit', 'n/a')}), grpcio {r['grpc_version']}, "
          f"Python {r['python']}, {r['cpus']} CPUs")
    section("Baselines")
    row(f"pipe: head -c {STREAM_BYTES // MB}M /dev/zero | cat", r.get("pipe_mbps"), "MB/s", spec=".0f")
    row("gRPC ceiling: one mTLS server stream", r.get("ceiling_mbps"), "MB/s",
        f"{fmt(r.get('ceiling_vs_pipe'), '.2f')} x pipe", spec=".0f")
    row("spawn /bin/true (Popen returns), p50", r.get("spawn_p50_ms"), "ms", spec=".2f")
    row("spawn /bin/true (Popen returns), p99", r.get("spawn_p99_ms"), "ms", spec=".2f")
    row("spawn /bin/true to exit, p50", r.get("spawn_exit_p50_ms"), "ms", spec=".2f")
    row("plain `sleep 60` process PSS", r.get("sleep_pss_mb"), "MB", spec=".2f")
    section("Start latency (warm channel)")
    for kind in ("plain", "isolated"):
        switch = "off" if kind == "plain" else "on"
        row(f"Start `true` back to back, isolation {switch}, p50", r.get(f"start_p50_ms_{kind}"), "ms",
            f"{fmt(r.get(f'start_p50_{kind}_vs_spawn'), '.1f')} x spawn", spec=".2f")
        row(f"Start `true` back to back, isolation {switch}, p99", r.get(f"start_p99_ms_{kind}"), "ms",
            f"{fmt(r.get(f'start_p99_{kind}_vs_spawn'), '.1f')} x spawn", spec=".2f")
    for kind in ("plain", "isolated"):
        switch = "off" if kind == "plain" else "on"
        for p in ("p50", "p99"):
            row(f"Start `true` after {PACE * 1000:.0f} ms idle, isolation {switch}, {p}",
                r.get(f"start_paced_{p}_ms_{kind}"), "ms",
                f"{fmt(r.get(f'start_paced_vs_query_{kind}'), '.2f')} x paced Query" if p == "p50" else None,
                spec=".2f")
        for p in ("p50", "p99"):
            row(f"Query of an ended job after {PACE * 1000:.0f} ms idle, isolation {switch}, {p}",
                r.get(f"query_paced_{p}_ms_{kind}"), "ms", spec=".2f")
    row(f"Query of an ended job after {PACE * 1000:.0f} ms idle, both servers, p50 / p99",
        f"{fmt(r.get('query_paced_p50_ms'), '.2f')} / {fmt(r.get('query_paced_p99_ms'), '.2f')}", "ms")
    for kind in ("plain", "isolated"):
        row(f"Start to stream's end, isolation {'off' if kind == 'plain' else 'on'}, p50",
            r.get(f"exit_p50_ms_{kind}"), "ms", f"{fmt(r.get(f'exit_p50_{kind}_vs_spawn'), '.1f')} x spawn-to-exit",
            spec=".2f")
        row(f"Start to stream's end, isolation {'off' if kind == 'plain' else 'on'}, p99",
            r.get(f"exit_p99_ms_{kind}"), "ms", f"{fmt(r.get(f'exit_p99_{kind}_vs_spawn'), '.1f')} x spawn-to-exit",
            spec=".2f")
    section(f"Start rate ({RATE_STARTS} back to back from {RATE_THREADS} client threads, a channel each)")
    row(f"spawn /bin/true from {RATE_THREADS} threads", r.get("spawn_rate_per_s"), "/s", spec=".0f")
    for kind in ("plain", "isolated"):
        row(f"Start `true`, isolation {'off' if kind == 'plain' else 'on'}", r.get(f"start_rate_per_s_{kind}"), "/s",
            f"{fmt(r.get(f'start_rate_{kind}_vs_spawn'), '.2f')} x spawn", spec=".0f")
    section(f"Stream throughput ({STREAM_BYTES // MB} MB of head -c, isolation on)")
    row("one client, API", r.get("stream_mbps"), "MB/s", f"{fmt(r.get('stream_vs_ceiling'), '.2f')} x ceiling, "
        f"{fmt(r.get('stream_vs_pipe'), '.2f')} x pipe", spec=".0f")
    row("one client, CLI into /dev/null", r.get("cli_stream_mbps"), "MB/s",
        f"{fmt(r.get('cli_stream_vs_ceiling'), '.2f')} x ceiling", spec=".0f")
    row("one client, API, the same job again once ended", r.get("stream_replay_mbps"), "MB/s",
        f"{fmt(r.get('stream_replay_vs_ceiling'), '.2f')} x ceiling", spec=".0f")
    row("the job's output taken in by the server", r.get("capture_mbps"), "MB/s",
        f"{fmt(r.get('capture_vs_pipe'), '.2f')} x pipe (job start to end, while streamed)", spec=".0f")
    for name in ("pipe", "ceiling", "stream", "cli_stream", "stream_replay", "capture"):
        runs = r.get(f"{name}_mbps_runs")
        if runs:
            row(f"  runs: {name}", " ".join(f"{v:.0f}" for v in runs), "MB/s")
    section(f"Fan-out ({FANOUT_CLIENTS} clients, one job)")
    row(f"aggregate, {FANOUT_BYTES // MB} MB job", r.get("fanout_mbps"), "MB/s",
        f"{fmt(r.get('fanout_vs_stream'), '.2f')} x one stream", spec=".0f")
    row(f"aggregate, {FANOUT_SMALL_BYTES // MB} MB job", r.get("fanout_small_mbps"), "MB/s", spec=".0f")
    row("slowest / fastest client", f"{fmt(r.get('fanout_client_min_mbps'), '.0f')} / "
        f"{fmt(r.get('fanout_client_max_mbps'), '.0f')}", "MB/s")
    row("clients with every byte", f"{r.get('fanout_clients_ok', 'n/a')}/{r.get('fanout_clients', 'n/a')}", "")
    row(f"server memory growth, {FANOUT_BYTES // MB} MB job", r.get("fanout_server_growth_mb"), "MB")
    row(f"server memory growth, {FANOUT_SMALL_BYTES // MB} MB job", r.get("fanout_server_growth_small_mb"), "MB")
    section(f"Scale ({SCALE_JOBS} x {' '.join(SCALE_COMMAND)}, isolation on, fresh server)")
    row("time to start them all", r.get("scale_start_s"), "s", f"{fmt(r.get('scale_starts_per_s'), '.0f')} starts/s",
        spec=".2f")
    row("running at once", r.get("scale_jobs"), "jobs", spec="d")
    row("PSS per job (init + command)", r.get("scale_job_pss_mb"), "MB",
        f"{fmt(r.get('scale_job_pss_vs_plain_process'), '.1f')} x plain process; mean of "
        f"{fmt(r.get('scale_jobs_measured'), 'd')} jobs", spec=".2f")
    row("  of which the init", r.get("scale_init_pss_mb"), "MB", spec=".2f")
    row("  of which the command", r.get("scale_command_pss_mb"), "MB", spec=".2f")
    row("launcher PSS (shared by all)", r.get("scale_launcher_pss_mb"), "MB", spec=".2f")
    row("host MemAvailable drop per job", r.get("scale_host_mem_per_job_mb"), "MB", "kernel included; noisy",
        spec=".2f")
    row("server RSS with all running", r.get("scale_server_rss_mb"), "MB",
        f"+{fmt(r.get('scale_server_growth_mb'), '.1f')} MB for the jobs")
    row("server threads with all running", r.get("scale_server_threads"), "", spec="d")
    row("List of all jobs (pages of 1000)", r.get("scale_list_ms"), "ms")
    row("time to Stop (force) them all", r.get("scale_stop_s"), "s", spec=".2f")
    row("processes left after Stop", r.get("scale_processes_left"), "", spec="d")
    section(f"Kept jobs (a server's start to listening, median of {REPS})")
    row("on an empty data directory", r.get("kept_start_s_empty"), "s", spec=".2f")
    row(f"on {KEPT_JOBS:,} ended jobs", r.get("kept_start_s"), "s",
        f"+{fmt(r.get('kept_load_s'), '.2f')} s to load them", spec=".2f")

    width = [max(len(str(x[i])) for x in rows if x) for i in range(4)]
    for line in rows:
        if line is None:
            print()
        elif not line[1] and not line[2]:
            print(line[0])
        else:
            print(f"{line[0]:<{width[0]}}  {line[1]:>{width[1]}} {line[2]:<{width[2]}}  {line[3]}")

    print("\nServer memory and threads per phase (VmHWM reset at each phase's start)")
    header = f"  {'phase':<40} {'process':<9} {'RSS start':>10} {'peak':>9} {'RSS end':>9} {'threads':>8}"
    print(header)
    for phase, records in monitor.phases:
        for name, rec in records.items():
            end = rec.get("rss_end_kb")
            print(f"  {phase:<40} {name:<9} {rec['rss_start_kb'] / 1024:>8.1f}MB {rec['hwm_kb'] / 1024:>7.1f}MB "
                  f"{'n/a' if end is None else f'{end / 1024:.1f}MB':>9} {rec['threads_max']:>8}")

    print("\nTargets")
    for _, label, ok, shown in checks:
        verdict = "PASS" if ok else ("FAIL" if ok is False else "n/a ")
        print(f"  {verdict}  {label:<52} {shown}")
    if r.get("errors"):
        print("\nErrors")
        for phase, message in r["errors"].items():
            print(f"  {phase}: {message}")
    print(flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def code_version():
    """What was measured: jobworker.py's SHA-256, and the git commit (with '+dirty' for uncommitted changes)."""
    import hashlib
    with open(JOBWORKER, "rb") as f:
        version = {"jobworker_sha256": hashlib.sha256(f.read()).hexdigest()[:16]}
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", "jobworker.py"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        if commit:
            version["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def bench():
    began = time.monotonic()
    signal.signal(signal.SIGTERM, _terminate)
    results = {"quick": QUICK, "stream_bytes": STREAM_BYTES, "stream_chunk": CHUNK, "cpus": os.cpu_count(),
               "grpc_version": grpc.__version__, "python": sys.version.split()[0], "errors": {}, **code_version()}
    remove_stale()
    workdir = tempfile.mkdtemp(prefix=f"{STALE_PREFIX}{os.getpid()}-")
    monitor = Monitor()
    servers = []
    ceiling = None

    def phase(name, function, *args):
        log(f"{name} ...")
        t0 = time.monotonic()
        try:
            function(*args)
        except Exception as e:  # the phase fails; the others still run
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else f"{type(e).__name__}: {e}"
            results["errors"][name] = detail
            log(f"{name} FAILED: {detail}")
            traceback.print_exc(file=sys.stderr)
        log(f"{name}: {time.monotonic() - t0:.1f} s")

    try:
        certs = make_certs(workdir)
        ceiling = Helper("--ceiling-server", workdir)
        ceiling_addr = f"127.0.0.1:{int(ceiling.line(60, 'the ceiling server').rsplit(' ', 1)[1])}"
        monitor.watch("ceiling", ceiling.process.pid)
        iso = ServerProcess("isolated", "on", certs, workdir)
        plain = ServerProcess("plain", "off", certs, workdir)
        for server in (iso, plain):
            servers.append(server)
            server.start()
            monitor.watch(server.name, server.pid)
        log(f"servers: isolated {iso.addr} (pid {iso.pid}), plain {plain.addr} (pid {plain.pid}), "
            f"ceiling {ceiling_addr}; data in {workdir}")

        with monitor.phase("start latency", ["isolated", "plain"]):
            phase("start latency", start_latency_phase, results, iso, plain)
        with monitor.phase("start rate", ["isolated", "plain"]):
            phase("start rate", start_rate_phase, results, iso, plain)
        with monitor.phase("stream throughput", ["isolated", "ceiling"]):
            phase("stream throughput", throughput_phase, results, iso, ceiling_addr, certs)
        phase("fan-out", fanout_phase, results, monitor, iso)
        results["sleep_pss_mb"] = sleep_pss_baseline()

        for server in (plain, iso):
            monitor.unwatch(server.name)
            results[f"server_{server.name}_stop"] = server.stop()
        monitor.unwatch("ceiling")
        ceiling.close()

        scale = ServerProcess("scale", "on", certs, workdir)
        servers.append(scale)
        scale.start()
        monitor.watch(scale.name, scale.pid)
        phase("scale", scale_phase, results, monitor, scale)
        monitor.unwatch(scale.name)
        results["server_scale_stop"] = scale.stop()
        phase("kept jobs", kept_phase, results, certs, workdir)
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                report = server.stop()
                results.setdefault(f"server_{server.name}_stop", report)
        if ceiling is not None:
            ceiling.close()
        monitor.close()
        shutil.rmtree(workdir, ignore_errors=True)

    if results.get("scale_start_s") and results.get("scale_jobs_requested"):
        results["scale_start_ms_per_job"] = results["scale_start_s"] * 1000 / results["scale_jobs_requested"]
    add_ratios(results)
    results["duration_s"] = time.monotonic() - began
    results["leftover_processes"] = sum((results.get(f"server_{s.name}_stop") or {}).get("leftover_processes", 0)
                                        for s in servers)
    for server in servers:
        status = (results.get(f"server_{server.name}_stop") or {}).get("exit_status")
        if status != 0:
            results["errors"][f"server {server.name}"] = f"exit status {status}"
    for phase_name, records in monitor.phases:
        key = "".join(c if c.isalnum() else "_" for c in phase_name.lower()).strip("_")
        while "__" in key:
            key = key.replace("__", "_")
        for name, rec in records.items():
            results[f"mem_{key}_{name}_hwm_mb"] = round(rec["hwm_kb"] / 1024, 1)
            results[f"mem_{key}_{name}_rss_start_mb"] = round(rec["rss_start_kb"] / 1024, 1)
            results[f"threads_{key}_{name}_max"] = rec["threads_max"]
    checks = evaluate(results)
    print_table(results, checks, monitor)
    if not results["errors"]:
        del results["errors"]
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in results.items()}, sort_keys=True),
          flush=True)
    return 1 if results.get("errors") else 0


def paced_starts_main(revisions):
    """--paced-starts: the paced Start and Query of each revision's server, isolation off and on, interleaved."""
    rounds = int(os.environ.get("BENCH_PACED_ROUNDS", "100"))
    workdir = tempfile.mkdtemp(prefix=f"{STALE_PREFIX}{os.getpid()}-")
    servers = {}
    try:
        certs = make_certs(workdir)
        for revision in revisions:
            tree = os.path.join(workdir, f"tree-{len(servers)}")
            os.mkdir(tree)
            archive = subprocess.run(["git", "-C", HERE, "archive", revision, "jobworker.py", "gen"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            for mode, isolation in (("plain", "off"), ("isolated", "on")):
                server = ServerProcess(f"{len(servers)}-{mode}", isolation, certs, workdir,
                                       os.path.join(tree, "jobworker.py"))
                servers[(revision, mode)] = server
                server.start()
        clients = {key: server.client() for key, server in servers.items()}
        ended = {}
        for key, client in clients.items():
            for _ in range(WARMUP):
                start_job(client, ["true"])
            ended[key] = run_to_end(client)
        samples = {key: {"start": [], "query": []} for key in clients}
        keys = list(clients)
        for round_ in range(rounds):
            for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:  # each server in turn goes first
                for kind in ("start", "query") if round_ % 2 == 0 else ("query", "start"):
                    time.sleep(PACE)
                    t0 = time.perf_counter()
                    if kind == "start":
                        start_job(clients[key], ["true"])
                    else:
                        clients[key].stub.Query(pb.QueryRequest(job_id=ended[key]), timeout=RPC_TIMEOUT)
                    samples[key][kind].append(time.perf_counter() - t0)
        results = {"paced_rounds": rounds, "revisions": revisions}
        print(f"paced Start and Query after {PACE * 1000:.0f} ms idle, p50 / p99 ms, {rounds} of each per server")
        for (revision, mode), measured in samples.items():
            print(f"  {revision:<20} isolation {'off' if mode == 'plain' else 'on ':<3}  "
                  + "  ".join(f"{kind} {percentile(measured[kind], 50) * 1000:6.2f} / "
                              f"{percentile(measured[kind], 99) * 1000:6.2f}" for kind in ("start", "query")))
            for kind in ("start", "query"):
                results[f"{kind}_paced_p50_ms_{mode}_{revision}"] = round(percentile(measured[kind], 50) * 1000, 3)
        print(json.dumps(results, sort_keys=True), flush=True)
        return 0
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv):
    if argv[:1] == ["--paced-starts"]:
        return paced_starts_main(argv[1:])
    if argv[:1] == ["--ceiling-server"]:
        return ceiling_server_main(*argv[1:])
    if argv[:1] == ["--fanout-worker"]:
        return fanout_worker_main(*argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv:  # a mistake, and a whole run takes minutes
        print(f"bench_jobworker.py: unknown arguments {argv} (see --help)", file=sys.stderr)
        return 2
    return bench()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
