#!/usr/bin/env python3
"""jobworker: run Linux commands for remote clients, safely.

A client with a certificate starts a job, stops it (gracefully or by force), queries its status and streams its
output, live and from the first byte, while other clients do the same. The service speaks gRPC over mutual TLS and
decides what each caller may do from the role (OU) in its certificate. Each job runs in its own cgroup and PID, mount
and network namespaces, under a small init of ours, as an unprivileged user.

    python jobworker.py serve                      # the service
    python jobworker.py start -- CMD [ARG...]      # the client: start, stop, query, stream, list

The file reads the way data flows: API types, the job and its output log, isolation (cgroups, namespaces, init), the
job manager, security, the gRPC servicer, the client, and the command line.
"""

import argparse
import collections
import contextlib
import ctypes
import errno
import fcntl
import gc
import importlib
import json
import logging
import math
import os
import pwd
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

log = logging.getLogger("jobworker")
_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------------------------------------------------------------
# API types
# ---------------------------------------------------------------------------------------------------------------------

class _ImportedOnFirstUse:
    """A module imported the first time one of its names is used.

    Every job's init is forked from a bare interpreter that loads this file; keeping grpc and protobuf out of it keeps
    that interpreter, and so every init, small and quick to fork.
    """

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = importlib.import_module(self._name)
        return getattr(module, attr)


grpc = _ImportedOnFirstUse("grpc")
pb = _ImportedOnFirstUse("gen.jobworker_pb2")
pb_grpc = _ImportedOnFirstUse("gen.jobworker_pb2_grpc")
json_format = _ImportedOnFirstUse("google.protobuf.json_format")

LIMITS = ("cpu_cores", "memory_bytes", "io_read_bps", "io_write_bps", "pids")
STREAM_CHUNK = 256 * 1024          # bytes in one Stream message
DEFAULT_STOP_GRACE = 10.0          # seconds between SIGTERM and SIGKILL when the client does not say
MAX_STOP_GRACE = 3600.0
SHUTDOWN_GRACE = 5.0               # the same, for the jobs still running when the server shuts down
KILL_GRACE = 5.0                   # seconds an init has to carry out a kill before it is killed itself
MAX_REQUEST_BYTES = 4 * 1024 * 1024
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE = 1, 2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class JobError(Exception):
    """A request the service refuses. `code` names its gRPC status, so that the job layer does not need grpc."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def parse_size(text):
    """'4096', '512K', '100M', '2G' -> bytes (binary multiples)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    digits = text.rstrip("KMGT")
    unit = text[len(digits):]
    if not digits.isdigit() or unit not in units:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G/T suffix)")
    return int(digits) * units[unit]


# ---------------------------------------------------------------------------------------------------------------------
# Job: its output log and its state
# ---------------------------------------------------------------------------------------------------------------------

STDOUT, STDERR = 0, 1


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class OutputLog:
    """A job's output on disk: every byte in arrival order (`output`), and where each run of one stream begins (`runs`).

    Keeping both on disk means a job that writes gigabytes costs the server no more memory than one that writes a
    line, and any number of readers can follow it at their own pace. One writer (the output pump) appends; `size`,
    `runs` and `closed` change under `cond`, and every change wakes the readers waiting on it.

    The output also leaves the page cache behind it: every WRITE_BEHIND bytes the log asks the disk to take them, and
    what the disk has taken and every reader has read is dropped from memory, as the writer and each reader move on
    (a reader of an ended job, too). A job that writes 100 GB does not push the host's own files out of memory, and
    its writes land in pages just freed rather than in memory touched for the first time (which, in a virtual
    machine, can cost the host a fault per page). A reader far behind reads the disk. On a disk slower than the job's
    output the pump waits for the disk, as it would for the kernel's own writeback.
    """

    RUN = struct.Struct("<QB")  # the offset where a run begins, and its source (STDOUT or STDERR)
    WRITE_BEHIND = 8 << 20

    def __init__(self, path):
        # Two files side by side rather than a directory per job: ext4 puts every new directory in a block group of
        # its own, and the first file made in one can wait for that group's bitmaps to come from disk (0.5 ms here).
        self.paths = (f"{path}.output", f"{path}.runs")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # one writer: its file position is the end
        self._output = os.open(self.paths[0], flags, 0o600)
        try:
            self._runs = os.open(self.paths[1], flags, 0o600)
        except OSError:
            os.close(self._output)
            os.unlink(self.paths[0])
            raise
        self._source = None
        self._written_back = self._kept_from = 0  # what the disk was asked to take; what the writer has dropped
        self.size = 0
        self.runs = 0
        self.closed = False
        self.readers = set()
        self.cond = threading.Condition()

    def take_from(self, source, pipe, limit):
        """Moves up to `limit` bytes that are waiting in `pipe` into the log; returns how many (0: the pipe ended).

        splice() moves them from the pipe to the file inside the kernel: the job's output never passes through this
        process, which leaves the CPU to the streams that read it back.
        """
        if hasattr(os, "splice"):  # Python 3.10+
            count = os.splice(pipe, self._output, limit)
        else:
            data = os.read(pipe, limit)
            _write_all(self._output, data)
            count = len(data)
        if not count:
            return 0
        new_run = source != self._source
        if new_run:
            _write_all(self._runs, self.RUN.pack(self.size, source))
            self._source = source
        with self.cond:  # readers see the bytes and their run only now, once both are in the files
            self.size += count
            self.runs += new_run
            self.cond.notify_all()
        if self.size - self._written_back >= self.WRITE_BEHIND:
            done = self._write_behind()
            # Dropped only up to what was handed to the disk a step before, which is written by now.
            self._kept_from = self.drop_behind(self._output, self._kept_from, done)
        return count

    def _write_behind(self):
        """Asks the disk to take what was written since the last time; returns where the last time ended."""
        done = self._written_back
        _libc.sync_file_range(self._output, ctypes.c_int64(done), ctypes.c_int64(self.size - done),
                              SYNC_FILE_RANGE_WRITE)
        with self.cond:
            self._written_back = self.size
        return done

    def drop_behind(self, fd, start, written=None):
        """Drops from memory, from `start` on, what the disk was asked to take (up to `written`) and every reader has
        read; returns where that ends. The writer and each reader (who may read again what was dropped) keep their own
        `start`, and call it with their own descriptor. Hints, never worth a job's output or a stream."""
        with self.cond:
            slowest = min((reader.offset for reader in self.readers), default=self.size)
            until = min(self._written_back if written is None else written, slowest) & ~(PAGE_SIZE - 1)
        if until <= start:
            return start
        # A page still being written cannot be dropped, and each page gets one try: wait for its write to end.
        _libc.sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(until - start), SYNC_FILE_RANGE_WAIT_BEFORE)
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, until - start, os.POSIX_FADV_DONTNEED)
        return until

    def close(self):
        self._write_behind()  # the last of it, so that its readers can drop it too
        os.close(self._output)
        os.close(self._runs)
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def remove(self):
        """Deletes a log no job will own (its Start failed)."""
        self.close()
        for path in self.paths:
            os.unlink(path)


class LogReader:
    """One reader's place in an OutputLog. Iterating yields (source, offset, data) until the log is closed and read.

    Its files are open only while it is being iterated, so a reader that is never started holds nothing.
    """

    def __init__(self, output_log, offset, chunk=STREAM_CHUNK):
        self._log = output_log
        self._chunk = chunk
        self.offset = offset
        self.cancelled = False
        self._runs = None

    def cancel(self):
        """Wakes the reader and ends it; called from another thread when the client goes away."""
        with self._log.cond:
            self.cancelled = True
            self._log.cond.notify_all()

    def _record(self, index):
        return OutputLog.RUN.unpack(os.pread(self._runs, OutputLog.RUN.size, index * OutputLog.RUN.size))

    def _find_run(self, runs):
        low, high = 0, runs - 1   # the last run that begins at or before offset
        while low < high:
            middle = (low + high + 1) // 2
            if self._record(middle)[0] <= self.offset:
                low = middle
            else:
                high = middle - 1
        return low

    def __iter__(self):
        output_log = self._log
        output = os.open(output_log.paths[0], os.O_RDONLY | os.O_CLOEXEC)
        self._runs = os.open(output_log.paths[1], os.O_RDONLY | os.O_CLOEXEC)
        run = run_end = source = None  # the run that holds offset, its source, and its end once the next has begun
        dropped = self.offset & ~(PAGE_SIZE - 1)  # what this reader read before it has left memory
        next_drop = self.offset + OutputLog.WRITE_BEHIND
        with output_log.cond:
            output_log.readers.add(self)  # what it has yet to read stays in memory
        try:
            while True:
                with output_log.cond:
                    while self.offset >= output_log.size and not output_log.closed and not self.cancelled:
                        output_log.cond.wait()
                    if self.cancelled or self.offset >= output_log.size:
                        return
                    size, runs = output_log.size, output_log.runs
                if run is None:
                    run = self._find_run(runs)
                if source is None:
                    source = self._record(run)[1]  # once a run, not once a chunk
                if run_end is None and run + 1 < runs:
                    run_end = self._record(run + 1)[0]
                end = size if run_end is None else run_end
                if self.offset >= end:
                    run, run_end, source = run + 1, None, None
                    continue
                data = os.pread(output, min(self._chunk, end - self.offset), self.offset)
                yield source, self.offset, data
                self.offset += len(data)
                if self.offset >= next_drop:
                    dropped = output_log.drop_behind(output, dropped)
                    next_drop = self.offset + OutputLog.WRITE_BEHIND
        finally:
            with output_log.cond:
                output_log.readers.discard(self)
            output_log.drop_behind(output, dropped)
            os.close(output)
            os.close(self._runs)


class Outcome:
    """How a job ended: its state, the command's exit code or the signal that ended it, and what it used."""

    def __init__(self, exit_code=None, sig=0, usage=None, state=None, ended_at=None):
        self.exit_code, self.signal, self.usage = exit_code, sig, usage or {}
        self.state, self.ended_at = state, ended_at


class Job:
    """One command run for a client: who owns it, its process, its output, and how it ended."""

    def __init__(self, job_id, owner, command, output_log, process):
        self.id = job_id
        self.owner = owner
        self.command = command
        self.log = output_log
        self.process = process
        self.started_at = time.time()
        self.outcome = None  # set once, when the job has ended, and never changed
        self.stop_requested = False
        self.ended = threading.Event()
        self._open_parts = {"stdout", "stderr", "init"}
        self._lock = threading.Lock()

    def part_ended(self, part):
        """Called by the output pump as each of stdout, stderr and the init reaches its end; the job ends with the last."""
        with self._lock:
            self._open_parts.discard(part)
            if self._open_parts:
                return
        try:
            outcome = self.process.finish()
        except Exception:
            log.exception("job %s: cannot read how it ended", self.id)
            outcome = Outcome(sig=signal.SIGKILL)
        if self.stop_requested:
            outcome.state = "STOPPED"
        elif outcome.usage.get("oom_killed") and outcome.signal == signal.SIGKILL:
            outcome.state = "OOM_KILLED"
        else:
            outcome.state = "EXITED"
        outcome.ended_at = time.time()
        self.outcome = outcome
        self.log.close()  # after the outcome is set, so a stream's last message carries it
        self.ended.set()

    def status(self):
        outcome = self.outcome
        status = pb.JobStatus(
            job_id=self.id, owner=self.owner, command=self.command, pid=self.process.pid,
            state=pb.JobState.Value(outcome.state if outcome else "RUNNING"), output_bytes=self.log.size,
            usage=pb.Usage(**(outcome.usage if outcome else self.process.usage())), isolation=self.process.isolation())
        status.started_at.FromNanoseconds(int(self.started_at * 1e9))
        if outcome:
            status.ended_at.FromNanoseconds(int(outcome.ended_at * 1e9))
            status.signal = outcome.signal
            if outcome.exit_code is not None:
                status.exit_code = outcome.exit_code
        return status


# ---------------------------------------------------------------------------------------------------------------------
# Isolation: cgroups, namespaces and the job's init
# ---------------------------------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NAME, PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 15, 36, 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # where a job's commands are looked for
NAMESPACES = {"pid": CLONE_NEWPID, "mount": CLONE_NEWNS, "network": CLONE_NEWNET}


def _check(result, what):
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def setns(fd, nstype):
    _check(_libc.setns(fd, nstype), "setns")


def mount(source, target, fstype, flags):
    _check(_libc.mount(source, target, fstype, flags, None), f"mount {target.decode()}")


def name_this_thread():
    """Shows the calling thread's Python name in ps, top and /proc as well (Python 3.14 does it by itself)."""
    _libc.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


def prctl(option, value):
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), "prctl")


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilitySets(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def clear_inheritable_capabilities():
    """Empties this thread's inheritable capabilities, which a command's exec would otherwise pass on to a program
    that carries file capabilities of its own (no privilege is needed to give them up)."""
    header = _CapabilityHeader(LINUX_CAPABILITY_VERSION_3, 0)
    sets = (_CapabilitySets * 2)()  # version 3: two of each, for capabilities 0-31 and 32-63
    _check(_libc.capget(ctypes.byref(header), sets), "capget")
    for part in sets:
        part.inheritable = 0
    _check(_libc.capset(ctypes.byref(header), sets), "capset")


def _read(path):
    with open(path) as f:
        return f.read()


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _keyed(path):
    """A cgroup file of 'key value' lines as a dict of ints."""
    try:
        return {key: int(value) for key, value in (line.split() for line in _read(path).splitlines() if line)}
    except (OSError, ValueError):
        return {}


def _mounts():
    """(mount point, fstype, super options) of every mount, from /proc/self/mountinfo."""
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        tail = fields[fields.index("-") + 1:]
        yield fields[4].replace("\\040", " "), tail[0], set(tail[2].split(","))


def block_device_of(path):
    """'MAJ:MIN' of the whole disk under path (the kernel throttles disks, not partitions), or None."""
    device = os.stat(path).st_dev
    node = f"{os.major(device)}:{os.minor(device)}"
    sysfs = f"/sys/dev/block/{node}"
    if not os.path.exists(sysfs):
        return None  # not a block device: tmpfs, overlay, ...
    if os.path.exists(os.path.join(sysfs, "partition")):
        return _read(os.path.join(sysfs, "..", "dev")).strip()
    return node


class Cgroups:
    """The host's cgroup hierarchy, in which every job gets a group of its own.

    Subclasses speak v2 (one unified tree) or v1 (one tree per controller). Jobs go under the server's own cgroup, so
    that whatever confines the server confines its jobs too, in a directory of this server's own (`jobworker-PID`),
    so that servers sharing a cgroup never touch each other's jobs. A job's group is a list of directories, one per
    tree.
    """

    version = None
    period_us = 100_000
    PREFIX = "jobworker-"

    def __init__(self, io_device, parents):
        self.io_device = io_device
        self.controllers = set()  # of "cpu", "memory", "io", "pids"
        self.parents = parents
        self.remove_stale()
        self.bases = [os.path.join(parent, f"{self.PREFIX}{os.getpid()}") for parent in parents]
        for base in self.bases:
            os.makedirs(base, exist_ok=True)

    @staticmethod
    def detect(choice="auto", io_device=None):
        """Cgroups for this host (`choice` of auto, v1, v2), or None when there is none we can use."""
        mounts = list(_mounts())
        v2 = next((point for point, fstype, _ in mounts if fstype == "cgroup2"), None)
        v1 = {option: point for point, fstype, options in mounts if fstype == "cgroup" for option in options}
        if choice == "v2" or (choice == "auto" and v2 and (not v1 or CgroupV2.has_controllers(v2))):
            return CgroupV2(v2, io_device) if v2 else None
        if choice in ("v1", "auto") and v1:
            return CgroupV1(v1, io_device)
        return None

    def create(self, name):
        """Makes a group; returns its directories."""
        directories = []
        try:
            for base in self.bases:
                directories.append(os.path.join(base, name))
                os.mkdir(directories[-1])
        except OSError:
            self.remove(directories)
            raise
        return directories

    def apply(self, directories, limits):
        """Applies `limits` to a group; returns the limits applied."""
        try:
            return self._apply(directories, limits)
        except OSError as e:
            raise JobError("INTERNAL", f"cannot apply the job's limits: {e}") from None

    def procs_files(self, directories):
        return [os.path.join(directory, "cgroup.procs") for directory in directories]

    def remove(self, directories):
        for directory in directories:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass

    def close(self):
        """Removes this server's directories, once every job has ended."""
        try:
            self.remove(self.bases)
        except OSError as e:
            log.error("cannot remove %s: %s", self.bases, e)

    def remove_stale(self):
        """Removes what a server that was killed outright left behind (its jobs' inits have already ended them)."""
        for parent in self.parents:
            for name in os.listdir(parent):
                pid = name[len(self.PREFIX):]
                if not name.startswith(self.PREFIX) or not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
                    continue
                base = os.path.join(parent, name)
                try:
                    groups = [entry.path for entry in os.scandir(base) if entry.is_dir(follow_symlinks=False)]
                    for group in groups:
                        self._kill_listed([group])
                    self.remove(groups + [base])
                except OSError as e:
                    log.warning("cannot remove the stale cgroup %s: %s", base, e)

    def _kill_listed(self, directories):
        for procs in self.procs_files(directories):
            for pid in _read(procs).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


class CgroupV2(Cgroups):
    version = "v2"
    WANTED = ("cpu", "memory", "io", "pids")

    @staticmethod
    def has_controllers(mount_point):
        return bool(set(_read(os.path.join(mount_point, "cgroup.controllers")).split()) & set(CgroupV2.WANTED))

    def __init__(self, mount_point, io_device):
        own_path = next(line[3:] for line in _read("/proc/self/cgroup").splitlines() if line.startswith("0::"))
        own = os.path.join(mount_point, own_path.lstrip("/"))
        if os.path.realpath(own) != os.path.realpath(mount_point):
            # A non-root group with processes in it cannot hand controllers to children ("no internal processes"),
            # so the server moves itself into a leaf of its own group, as a delegated systemd service does.
            leaf = os.path.join(own, "supervisor")
            os.makedirs(leaf, exist_ok=True)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        super().__init__(io_device, [own])
        available = set(_read(os.path.join(own, "cgroup.controllers")).split())
        self.controllers = available & set(self.WANTED)
        for directory in (own, self.bases[0]):
            for controller in sorted(self.controllers):
                try:
                    _write(os.path.join(directory, "cgroup.subtree_control"), "+" + controller)
                except OSError:
                    self.controllers.discard(controller)

    def _apply(self, directories, limits):
        (directory,), applied = directories, {}

        def put(name, value, limit):
            _write(os.path.join(directory, name), value)
            applied[limit] = limits[limit]

        if limits["cpu_cores"] and "cpu" in self.controllers:
            put("cpu.max", f"{max(1000, int(limits['cpu_cores'] * self.period_us))} {self.period_us}", "cpu_cores")
        if limits["memory_bytes"] and "memory" in self.controllers:
            put("memory.max", str(limits["memory_bytes"]), "memory_bytes")
            if os.path.exists(os.path.join(directory, "memory.swap.max")):
                _write(os.path.join(directory, "memory.swap.max"), "0")
        if limits["pids"] and "pids" in self.controllers:
            put("pids.max", str(limits["pids"] + 1), "pids")  # + the init
        io = {"io_read_bps": "rbps", "io_write_bps": "wbps"}
        if self.io_device and "io" in self.controllers:
            for limit, key in io.items():
                if limits[limit]:
                    put("io.max", f"{self.io_device} {key}={limits[limit]}", limit)
        return applied

    def kill(self, directories):
        for directory in directories:
            kill_file = os.path.join(directory, "cgroup.kill")
            if os.path.exists(kill_file):
                _write(kill_file, "1")
            else:  # before Linux 5.14
                self._kill_listed([directory])

    def usage(self, directories):
        (directory,) = directories
        cpu = _keyed(os.path.join(directory, "cpu.stat")).get("usage_usec", 0) / 1e6
        peak = os.path.join(directory, "memory.peak")
        events = _keyed(os.path.join(directory, "memory.events"))
        return {"cpu_seconds": cpu, "peak_memory_bytes": int(_read(peak)) if os.path.exists(peak) else 0,
                "oom_killed": events.get("oom_kill", 0) > 0}


class CgroupV1(Cgroups):
    version = "v1"
    TREES = {"cpu": "cpu", "cpuacct": None, "memory": "memory", "blkio": "io", "pids": "pids"}

    def __init__(self, mounts, io_device):
        own = {}
        for _, controllers, path in (line.split(":", 2) for line in _read("/proc/self/cgroup").splitlines()):
            for controller in controllers.split(","):
                own[controller] = path
        parents = {controller: os.path.join(mounts[controller], own[controller].lstrip("/"))
                   for controller in self.TREES if controller in mounts and controller in own}
        super().__init__(io_device, sorted(set(parents.values())))  # a tree may hold several ("cpu,cpuacct")
        self.dirs = {controller: os.path.join(parent, f"{self.PREFIX}{os.getpid()}")
                     for controller, parent in parents.items()}  # controller -> this server's directory in its tree
        self.controllers = {self.TREES[c] for c in self.dirs if self.TREES[c]}

    def _in(self, directories, controller, name):
        base = self.dirs[controller]
        return next(os.path.join(d, name) for d in directories if os.path.dirname(d) == base)

    def _apply(self, directories, limits):
        applied = {}
        if limits["cpu_cores"] and "cpu" in self.dirs:
            _write(self._in(directories, "cpu", "cpu.cfs_period_us"), str(self.period_us))
            _write(self._in(directories, "cpu", "cpu.cfs_quota_us"),
                   str(max(1000, int(limits["cpu_cores"] * self.period_us))))
            applied["cpu_cores"] = limits["cpu_cores"]
        if limits["memory_bytes"] and "memory" in self.dirs:
            _write(self._in(directories, "memory", "memory.limit_in_bytes"), str(limits["memory_bytes"]))
            memsw = self._in(directories, "memory", "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # memory + swap: swap cannot be used to escape the limit
                _write(memsw, str(limits["memory_bytes"]))
            applied["memory_bytes"] = limits["memory_bytes"]
        if limits["pids"] and "pids" in self.dirs:
            _write(self._in(directories, "pids", "pids.max"), str(limits["pids"] + 1))  # + the init
            applied["pids"] = limits["pids"]
        files = {"io_read_bps": "blkio.throttle.read_bps_device", "io_write_bps": "blkio.throttle.write_bps_device"}
        for limit, name in files.items():
            if limits[limit] and "blkio" in self.dirs and self.io_device:
                _write(self._in(directories, "blkio", name), f"{self.io_device} {limits[limit]}")
                applied[limit] = limits[limit]
        return applied

    def kill(self, directories):
        self._kill_listed(directories[:1])  # every tree holds the same processes

    def usage(self, directories):
        usage = {"cpu_seconds": 0.0, "peak_memory_bytes": 0, "oom_killed": False}
        if "cpuacct" in self.dirs:
            usage["cpu_seconds"] = int(_read(self._in(directories, "cpuacct", "cpuacct.usage"))) / 1e9
        if "memory" in self.dirs:
            usage["peak_memory_bytes"] = int(_read(self._in(directories, "memory", "memory.max_usage_in_bytes")))
            oom = _keyed(self._in(directories, "memory", "memory.oom_control"))
            usage["oom_killed"] = oom.get("oom_kill", 0) > 0
        return usage


class JobProcess:
    """The server's handle on a running job: the control channel to its init, the init's pidfd, and its cgroup.

    An init without namespaces or a cgroup of its own can run job after job (`take_back` returns it to the pool once
    its job has ended): from then on the handle says nothing more to it, as it may already be running another job.
    """

    def __init__(self, slot, pid, sandbox, applied, take_back=None):
        self.channel, self.pidfd, self.init_pid, self.pid = slot.channel, slot.pidfd, slot.pid, pid
        self._group, self._applied, self._sandbox = slot.group, applied, sandbox
        self._take_back = take_back
        self._lock = threading.Lock()  # what is said to the init, or done to the cgroup, must not race finish()
        self._final_usage = None

    @property
    def end_fd(self):
        """What becomes readable once the init is done with the job: its channel, where an init that runs another job
        reports how this one ended, or else its pidfd, as it exits (after which its cgroup can go)."""
        return self.channel.fileno() if self._take_back else self.pidfd

    def signal(self, sig):
        """Asks the init to send `sig` to every process of the job."""
        with self._lock:
            if self._final_usage is None:
                self._tell({"signal": int(sig)})

    def kill(self):
        """SIGKILL to every process of the job: through the cgroup, then through the init."""
        with self._lock:
            if self._final_usage is not None:
                return  # already over
            if self._group:
                try:
                    self._sandbox.cgroups.kill(self._group)
                except OSError as e:
                    log.warning("cgroup kill of job %s: %s", os.path.basename(self._group[0]), e)
            if not self._tell({"kill": True}):
                self._kill_init()

    def kill_init(self):
        """SIGKILL to the init itself, for one that does not act on a kill: a job without a PID namespace can stop
        its init. What the job still runs dies with the init's PID namespace, or comes to the launcher (a child
        subreaper), which kills it."""
        with self._lock:
            if self._final_usage is None:
                self._kill_init()

    def _kill_init(self):
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def _tell(self, message):
        """Whether the message was sent: never waits (under the lock) for an init that does not read its channel."""
        try:
            self.channel.send(json.dumps(message).encode(), socket.MSG_DONTWAIT)
            return True
        except OSError:
            return False  # the init has gone (and so has the job), or it is stopped and its channel full

    def usage(self):
        if self._final_usage is not None:
            return self._final_usage
        try:
            return self._sandbox.cgroups.usage(self._group) if self._group else {}
        except OSError:
            return {}

    def finish(self):
        """Called once the init is done with the job (end_fd): reads its report, then releases the init and cgroup."""
        outcome, failed = None, False
        self.channel.setblocking(False)
        while outcome is None:
            try:
                message = self.channel.recv(65536)
            except ConnectionResetError:
                continue  # the init left some of our messages unread; its own are still queued after this
            except BlockingIOError:
                break
            if not message:
                break
            try:
                message = json.loads(message)
            except ValueError:
                continue
            if "exit" in message:
                outcome = Outcome(exit_code=message["exit"])
            elif "signal" in message:
                outcome = Outcome(sig=message["signal"])
            elif "error" in message:
                failed = True  # the init itself failed, and is on its way out
        with self._lock:
            reusable = outcome is not None and self._take_back and not failed
            outcome = outcome or Outcome(sig=signal.SIGKILL)  # no report: the init itself was killed (cgroup kill, OOM)
            outcome.usage = self._final_usage = self.usage()
            if reusable:
                self.channel.setblocking(True)
                self._take_back(self.channel, self.pidfd, self.init_pid)
            else:
                self.channel.close()
                os.close(self.pidfd)
            if self._group:
                try:
                    self._sandbox.cgroups.remove(self._group)
                except OSError as e:
                    log.error("cannot remove the cgroup of job %s: %s", os.path.basename(self._group[0]), e)
        return outcome

    def isolation(self):
        sandbox = self._sandbox
        return pb.Isolation(mode=sandbox.mode, cgroup=sandbox.cgroups.version if self._group else "",
                            namespaces=sandbox.namespaces, limits=pb.Limits(**self._applied), user=sandbox.user)


class InitSlot:
    """Everything a job needs before its command, made ahead of time: its id, its (empty) output log, and its init
    (in a cgroup named for the id, and namespaces of its own, if the server isolates jobs), waiting for a command."""

    def __init__(self, channel=None, pidfd=None, pid=None):
        self.id = str(uuid.uuid4())
        self.channel, self.pidfd, self.pid = channel, pidfd, pid
        self.log = self.group = None


class Launcher:
    """Starts every job's init, through a small single-threaded process of its own (a zygote), ahead of time.

    The server is multi-threaded, and forking it to run Python code in the child is unsafe; spawning a fresh
    interpreter per job costs tens of milliseconds. So one bare interpreter loads this file at start-up and forks each
    init from itself on request, and each init, once in its cgroup and namespaces, waits for a command. A few of them
    are kept ready (`POOL`), so that a Start pays for none of that (a fork, namespaces, a cgroup migration: a few
    milliseconds), only for the command's own exec. Requests go to the launcher over a Unix socket with the init's
    channel attached; the init talks to the server directly on that channel.

    Without namespaces and cgroups (isolation off), an init has nothing of its own that a job could leave behind, so
    once its job has ended it takes the next one (up to `KEEP` of them wait), rather than exit for a new one:
    making an init and ending it costs the host several times what the Start itself does (a fork, the pages the
    child copies, and their unmapping at exit), and an init that has already run a command runs the next one sooner.
    """

    BOOT = ("import importlib.util as u, sys; s = u.spec_from_file_location('jobworker_launcher', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.Launcher.serve(int(sys.argv[2]))")
    HEADER = struct.Struct("<I")
    POOL = 4
    KEEP = 8

    def __init__(self, sandbox, logs_dir):
        self.sandbox = sandbox
        self.logs_dir = logs_dir
        # Whether an init may run job after job: only if it has nothing of its own a job could leave something in,
        # and is out of the job's reach (root, with the job run as another user).
        self.reusable = not sandbox.cgroups and not sandbox.namespace_flags and os.geteuid() == 0 and sandbox.uid != 0
        self._lock = threading.Lock()  # for the launcher's socket
        self._start_launcher()
        self._ready = collections.deque()  # the init that became ready last is taken first: it is the warmest
        self._returned = collections.deque()  # inits whose job has ended, to be made ready again
        self._failure = None  # why the last init could not be made, for the Start waiting for one
        self._changed = threading.Condition()
        self._closed = False
        self._filler = threading.Thread(target=self._fill, name="init-pool", daemon=True)
        self._filler.start()

    def _start_launcher(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket = ours
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", self.BOOT, os.path.abspath(__file__), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={"LANG": "C.UTF-8"})  # none of our secrets
        theirs.close()

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._filler.join()
        while self._ready:
            self._discard(self._ready.popleft())
        while self._returned:
            self._discard(self._returned.popleft())
        self._socket.close()  # the launcher exits when it sees the end of its socket
        self._process.wait()

    def spawn(self, command, limits):
        """Starts `command` in a ready init, once it has been executed: returns (slot, JobProcess, stdout, stderr)."""
        sandbox = self.sandbox
        slot = self._take()
        with contextlib.ExitStack() as undo:  # everything a failed start must release, in reverse order
            undo.callback(self.refill)
            undo.callback(self._discard, slot)
            applied = sandbox.cgroups.apply(slot.group, limits) if slot.group else {}
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            undo.callback(os.close, out_r)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            undo.callback(os.close, err_r)
            job = {"command": command, "env": sandbox.environment, "cwd": "/", "uid": sandbox.uid, "gid": sandbox.gid}
            spec = os.memfd_create("job", os.MFD_CLOEXEC)  # a command line of any size, in one message
            try:
                _write_all(spec, json.dumps(job).encode())
                socket.send_fds(slot.channel, [b'{"job": true}'], [spec, out_w, err_w])
            except OSError as e:
                raise JobError("INTERNAL", f"the job's init has gone: {e}") from None
            finally:  # the init has its own copies now
                for fd in (spec, out_w, err_w):
                    os.close(fd)
            started = self._expect(slot, "started", command)
            undo.pop_all()
        # The init knows its command's pid as its own PID namespace numbers it; ours is the init's only child.
        pid = (_child_of(slot.pid) or slot.pid) if sandbox.namespace_flags & CLONE_NEWPID else started["started"]
        process = JobProcess(slot, pid, sandbox, applied, self.take_back if self.reusable else None)
        return slot, process, out_r, err_r

    def _take(self):
        """A ready init, waiting for one to be made if none is; one that died while it waited is passed over."""
        while True:
            slot = self._take_ready()
            if not _readable(slot.channel):  # a ready init says nothing until it is given a job: it has gone
                return slot
            self._discard(slot)

    def _take_ready(self):
        with self._changed:
            if self._ready:
                return self._ready.pop()  # the filler replaces it once this Start is done (refill)
            self._failure = None
            self._changed.notify_all()
            while not self._ready:
                if self._closed:
                    raise JobError("UNAVAILABLE", "the server is shutting down")
                if self._failure:
                    raise self._failure
                self._changed.wait()
            return self._ready.pop()

    def take_back(self, channel, pidfd, pid):
        """Has the filler make ready again an init whose job has ended (one without namespaces or a cgroup)."""
        slot = InitSlot(channel, pidfd, pid)
        with self._changed:
            if not self._closed:
                self._returned.append(slot)
                self._changed.notify_all()
                return
        self._discard(slot)

    def refill(self):
        """Has the filler replace the inits taken. Called once the Start's answer is on its way, not before: the
        filler and the Start would compete for the CPU and the GIL."""
        with self._changed:
            self._failure = None
            self._changed.notify_all()

    def _fill(self):
        """The pool's own thread: keeps POOL inits ready.

        It orders every missing init before it waits for the first: the launcher forks the next while the last one
        prepares, so a pool emptied by a burst of Starts fills again faster than one init at a time would.
        """
        name_this_thread()
        while True:
            with self._changed:
                while not self._closed and not self._returned and (len(self._ready) >= self.POOL or self._failure):
                    self._changed.wait()
                if self._closed:
                    return
                returned, self._returned = self._returned, collections.deque()
            for slot in returned:
                self._recycle(slot)
            with self._changed:
                missing = 0 if self._failure or self._closed else self.POOL - len(self._ready)
            ordered, failure = [], None
            try:
                for _ in range(missing):
                    ordered.append(self._order())
            except Exception as e:
                failure = _unexpected(e)
            for slot in ordered:
                try:
                    self._await_ready(slot)
                except Exception as e:
                    failure = _unexpected(e)
                    continue
                with self._changed:
                    self._ready.append(slot)
                    self._changed.notify_all()
            if failure:  # reported to the Start that waits; tried again at the next Start
                log.error("cannot prepare a job's init: %s", failure)
                with self._changed:
                    self._failure = failure
                    self._changed.notify_all()

    def _recycle(self, slot):
        """Makes ready again an init whose job has ended, with a new job id and log, unless KEEP are ready."""
        with self._changed:
            keep = len(self._ready) < self.KEEP
        try:
            if keep:
                slot.log = OutputLog(os.path.join(self.logs_dir, slot.id))
        except OSError as e:
            log.error("cannot make a job's output log: %s", e)
            keep = False
        if not keep:
            self._discard(slot)
            return
        with self._changed:
            self._ready.append(slot)
            self._changed.notify_all()

    def _order(self):
        """Has the launcher fork an init into a new cgroup and namespaces; returns its slot, the init on its way."""
        sandbox = self.sandbox
        slot = InitSlot()
        with contextlib.ExitStack() as undo:
            undo.callback(self._discard, slot)
            slot.log = OutputLog(os.path.join(self.logs_dir, slot.id))
            slot.group = sandbox.cgroups.create(slot.id) if sandbox.cgroups else None
            slot.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            request = {"namespaces": sandbox.namespace_flags, "reusable": self.reusable,
                       "cgroup_procs": sandbox.cgroups.procs_files(slot.group) if slot.group else []}
            try:
                self._send(request, [theirs.fileno()])
            finally:
                theirs.close()  # the launcher has its own copy now
            undo.pop_all()
        return slot

    def _await_ready(self, slot):
        """Waits for an ordered init to be ready; discards it if it cannot be."""
        with contextlib.ExitStack() as undo:
            undo.callback(self._discard, slot)
            slot.channel.settimeout(30)
            try:  # the init's first words: its own pidfd, then that it is ready (or why not)
                message, fds, _, _ = socket.recv_fds(slot.channel, 65536, 1)
            except OSError as e:
                raise JobError("INTERNAL", f"the job's init did not answer: {e}") from None
            if not fds:
                raise _start_error(json.loads(message) if message else {}, None)
            slot.pidfd = fds[0]
            slot.pid = _pid_of(slot.pidfd)
            self._expect(slot, "ready", None)
            undo.pop_all()

    @staticmethod
    def _expect(slot, word, command):
        """Reads the init's next message; anything but `word` is an error (after which the init exits)."""
        try:
            reply = slot.channel.recv(65536)
            message = json.loads(reply) if reply else {}
        except (OSError, ValueError) as e:
            message = {"error": errno.EIO, "stage": "launch", "message": f"the job's init did not answer: {e}"}
        if word not in message:
            raise _start_error(message, command)
        slot.channel.settimeout(None)
        return message

    def _discard(self, slot):
        """Releases an init that will run no job: it exits when its channel closes; then its cgroup can go."""
        if slot.channel is not None:
            slot.channel.close()
        if slot.pidfd is not None:
            exited = select.poll()  # not select(): a busy server's descriptors go past 1024
            exited.register(slot.pidfd, select.POLLIN)
            exited.poll(10_000)
            os.close(slot.pidfd)
            slot.pidfd = None
        if slot.group:
            try:
                self.sandbox.cgroups.remove(slot.group)
            except OSError as e:
                log.error("cannot remove the cgroup %s: %s", slot.group[0], e)
        if slot.log:
            slot.log.remove()

    def _send(self, request, fds):
        body = json.dumps(request).encode()
        with self._lock:
            if self._process.poll() is not None:
                log.error("the job launcher exited (status %s); starting another", self._process.returncode)
                self._socket.close()
                self._start_launcher()
            try:
                socket.send_fds(self._socket, [self.HEADER.pack(len(body))], fds)
                self._socket.sendall(body)
            except OSError as e:
                raise JobError("UNAVAILABLE", f"the job launcher is not running: {e}") from None

    # -- the launcher process -----------------------------------------------------------------------------------------

    @staticmethod
    def serve(fd):
        """The launcher's main loop: fork an init for every request until the server goes away."""
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the server
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the server blocks its shutdown signals; jobs must not
        # Every init is a fork of this process: the collector would touch (and so copy) every object in each of
        # them, and nothing here makes cycles worth collecting.
        gc.disable()
        gc.freeze()
        if os.geteuid() == 0:
            os.nice(10)  # making inits ahead of time must not slow the server; each init resets it for its command
        # A job without a PID namespace can kill its init (they share a user): what it leaves comes to us, and ends.
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        inits = set()
        requests = socket.socket(fileno=fd)
        own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd tells the loop to reap
        while True:
            ready, _, _ = select.select([requests, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
                inits -= _reap_all()
                for orphan in set(_children(os.getpid())) - inits:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(orphan, signal.SIGKILL)  # reaped at its SIGCHLD; its own children come to us then
            if requests in ready:
                request, fds = Launcher._receive(requests)
                if request is None:
                    os._exit(0)  # the server has gone
                try:
                    pid = Launcher._fork_init(request, fds, own_pid_ns, [fd, wake_r, wake_w, own_pid_ns])
                    if pid:  # else the fork failed, and the server has been told
                        inits.add(pid)
                except Exception as e:  # one bad request must not cost the server its launcher
                    print(f"jobworker launcher: {e!r}", file=sys.stderr)
                finally:
                    for received in fds:
                        os.close(received)

    @staticmethod
    def _receive(requests):
        """One request and its descriptors, or (None, []) at the end of the socket."""
        header, fds, _, _ = socket.recv_fds(requests, Launcher.HEADER.size, 3)
        body = bytearray()
        while header and len(header) < Launcher.HEADER.size:
            more = requests.recv(Launcher.HEADER.size - len(header))
            header = more and header + more
        size = Launcher.HEADER.unpack(header)[0] if header else 0
        while header and len(body) < size:
            more = requests.recv(size - len(body))
            header = header if more else b""
            body += more
        if not header:
            for received in fds:
                os.close(received)
            return None, []
        return json.loads(body), fds

    @staticmethod
    def _fork_init(request, fds, own_pid_ns, launcher_fds):
        (channel,) = fds
        try:
            pid = _fork(own_pid_ns if request["namespaces"] & CLONE_NEWPID else None)
        except OSError as e:
            _say(channel, {"error": e.errno, "stage": "launch", "message": str(e)})
            return None
        if pid == 0:
            try:
                for fd in launcher_fds:
                    os.close(fd)
                signal.set_wakeup_fd(-1)
                Init(channel, request).run()
            finally:
                os._exit(1)
        return pid


def _fork(own_pid_ns=None):
    """os.fork(); given the launcher's own PID namespace, the child is pid 1 of a new one (and later children are not)."""
    if own_pid_ns is None:
        return os.fork()
    unshare(CLONE_NEWPID)
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            setns(own_pid_ns, CLONE_NEWPID)
    return pid


def _say(channel_fd, message):
    """One message on a job's channel (a SOCK_SEQPACKET socket); a peer that has gone is no error."""
    try:
        os.write(channel_fd, json.dumps(message).encode())
    except OSError:
        pass


def _pid_of(pidfd):
    """The pid a pidfd refers to, as this process sees it."""
    for line in _read(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise OSError(errno.ESRCH, "no pid in the pidfd's fdinfo")


def _readable(sock):
    """Whether a socket has something to read (or has reached its end), without waiting."""
    ready = select.poll()
    ready.register(sock, select.POLLIN)
    return bool(ready.poll(0))


def _reap_all():
    """Reaps every child that has exited; returns their pids."""
    reaped = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


def _child_of(pid):
    """The host pid of a process's only child (the job's command under its init), or None if unknown."""
    try:
        children = _read(f"/proc/{pid}/task/{pid}/children").split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _unexpected(error):
    """A JobError as it is; anything else (a bug) logged in full and reported as INTERNAL, so no Start waits forever."""
    if isinstance(error, JobError):
        return error
    log.error("unexpected error", exc_info=error)
    return JobError("INTERNAL", f"unexpected error: {error!r}")


def _start_error(message, command):
    if "error" not in message:  # the channel closed with nothing said: the init (or the launcher) died
        return JobError("INTERNAL", "the job's init went away before it said why")
    code = message["error"]
    if message.get("stage") == "exec":
        if code in (errno.EAGAIN, errno.ENOMEM):
            return JobError("RESOURCE_EXHAUSTED", f"cannot start {command[0]!r}: {os.strerror(code)}")
        return JobError("INVALID_ARGUMENT", f"cannot execute {command[0]!r}: {os.strerror(code)}")
    return JobError("INTERNAL", f"cannot set up the job ({message['stage']}): {message['message']}")


class Init:
    """The first process of every job: pid 1 of its PID namespace, between the server and the command.

    Made ahead of its job, it places itself in the job's cgroup, enters the job's mount and network namespaces, mounts
    the job's own /proc, brings loopback up, and says it is ready. Given a job, it becomes the job's user and starts
    the command. Then it does what the kernel expects of an init and what the server needs of a job: it reaps every
    zombie, passes stop signals on to every process of the job, and once the command exits it ends whatever the
    command left running, reports the command's own status, and exits. If the server goes away (its end of the
    channel closes), the init ends the job with it.

    An init without namespaces or a cgroup (isolation off) is `reusable`: after its report it takes root back and
    waits for another job, as it was before its first. While a job runs, the init is the job's user in its real and
    effective ids only; its saved ids stay root's, which lets it take root back, and which the command cannot use (its
    exec makes them the job user's too). Its permitted capabilities stay too, and keep it out of the job's reach:
    the job may signal it (they share a real uid), but not ptrace it, renice it or change its limits. The server
    reuses inits only when it is root and runs jobs as another user.
    """

    FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, channel, request):
        self.channel = socket.socket(fileno=channel)
        self.request = request
        self.pid_ns = bool(request["namespaces"] & CLONE_NEWPID)
        self.reusable = request.get("reusable", False)
        self.owner = None  # our own ids while a reusable init runs a job as its user
        self.command_pid = None

    def run(self):
        # Our own pidfd comes first, so the server learns who we are before anything else we say.
        pidfd = os.pidfd_open(os.getpid())
        socket.send_fds(self.channel, [b'{"init": true}'], [pidfd])
        os.close(pidfd)
        try:
            self._run()
        except BaseException as e:  # an init must never return into the launcher's loop
            self._say({"error": getattr(e, "errno", None) or errno.EIO, "stage": "init", "message": repr(e)})
            self._say({"signal": signal.SIGKILL})
        os._exit(0)

    def _say(self, message):
        if "message" in message:
            message["message"] = message["message"][:500]
        _say(self.channel.fileno(), message)

    def _run(self):
        if not self._prepare():
            return
        self._say({"ready": True})
        while True:
            job = self._next_job()
            if job is None:
                return  # the server no longer needs us (shutdown, or more inits are ready than it keeps)
            status = self._run_job(*job)
            if status is None:
                return  # the command did not start; the server knows why, and discards us
            self._say(status)
            if not self.reusable:
                return

    def _next_job(self):
        """The server's next job (its spec, stdout and stderr), passing over what it said for the one before."""
        self.channel.setblocking(True)
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 4096, 3)
            except OSError:
                return None
            if len(fds) == 3:
                for fd in fds:  # the command gets stdout and stderr as 1 and 2 (posix_spawn's dup2), nothing more
                    os.set_inheritable(fd, False)
                return fds
            for fd in fds:
                os.close(fd)
            if not message:
                return None

    def _run_job(self, spec, stdout, stderr):
        """Starts the job's command and sees it through; returns the command's status, or None if it did not start."""
        job = json.loads(os.pread(spec, os.fstat(spec).st_size, 0))
        os.close(spec)
        wake_r = self.wake_r
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_r, 4096):  # signals sent to us before this job are not for it
                pass
        if not self._start(job, stdout, stderr):
            return None
        self.channel.setblocking(False)
        status = None
        while status is None:
            ready, _, _ = select.select([wake_r, self.channel], [], [])
            if self.channel in ready:
                status = self._obey()
            if wake_r in ready:
                for sig in os.read(wake_r, 4096):
                    if sig == signal.SIGCHLD:
                        status = self._reap() or status
                    else:
                        self._forward(sig)
        self._end_everything()
        if self.owner is not None:  # reusable: root again, for the next job
            uid, gid = self.owner
            os.setresuid(uid, uid, uid)
            os.setresgid(gid, gid, gid)
            self.owner = None
        return status

    def _prepare(self):
        """Everything that does not depend on the job: its cgroup, its namespaces, our signals and descriptors."""
        request = self.request
        stage = "cgroup"
        self.wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in self.FORWARDED + (signal.SIGCHLD,):
            signal.signal(sig, lambda *_: None)  # the signal's number arrives on wake_r
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2:  # so that the command inherits nothing of ours (posix_spawn has no close_fds)
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
        try:
            for procs in request["cgroup_procs"]:
                _write(procs, "0")  # before anything of the job runs, so nothing it forks is ever outside
            stage = "namespaces"
            flags = request["namespaces"] & (CLONE_NEWNS | CLONE_NEWNET)
            if flags:
                unshare(flags)
            if flags & CLONE_NEWNS:
                mount(b"none", b"/", None, MS_REC | MS_PRIVATE)  # our mounts stay ours
                if self.pid_ns:
                    mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            if flags & CLONE_NEWNET:
                _loopback_up()
            if not self.pid_ns:
                prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, not to the host's init
            stage = "privilege"
            # Nothing of the server's privilege but root's ids goes to the job: none of the capabilities it may have
            # been started with, ambient or inheritable (ambient ones would survive the command's exec while a saved
            # id is root; inheritable ones combine with a file's own), and no groups.
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
            clear_inheritable_capabilities()
            if os.geteuid() == 0:
                os.setgroups([])
                os.setpriority(os.PRIO_PROCESS, 0, 0)  # made at the launcher's lower priority; now a Start waits
        except OSError as e:
            self._say({"error": e.errno, "stage": stage, "message": str(e)})
            return False
        return True

    def _start(self, job, stdout, stderr):
        """Becomes the job's user and executes the command; reports the outcome to the server."""
        stage = "user"
        try:
            if job["uid"] != os.geteuid():
                self._become(job["uid"], job["gid"])
            stage = "exec"
            os.chdir(job["cwd"])
            os.environ["PATH"] = job["env"]["PATH"]  # where posix_spawnp looks for the command
            # posix_spawn (a vfork and an exec, in C) is several times quicker than Popen in a freshly forked init.
            self.command_pid = os.posix_spawnp(
                job["command"][0], job["command"], job["env"], setsid=True, setsigmask=(),
                setsigdef=self.FORWARDED + (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stderr, 2)])
        except (OSError, ValueError) as e:
            code = getattr(e, "errno", None) or errno.EINVAL
            self._say({"error": code, "stage": stage, "message": str(e)})
            return False
        finally:
            os.close(stdout)
            os.close(stderr)
        self._say({"started": self.command_pid})
        return True

    def _become(self, uid, gid):
        """Becomes the job's user (no groups, no capabilities: see _prepare), so that nothing of the job runs as root,
        the init included: for good, or, in a reusable init, with our own ids kept as the saved ones (the command's
        exec replaces them with the user's)."""
        if self.reusable:
            self.owner = os.getuid(), os.getgid()
        saved_uid, saved_gid = self.owner or (uid, gid)
        os.setresgid(gid, gid, saved_gid)
        os.setresuid(uid, uid, saved_uid)

    def _obey(self):
        """A message from the server, or the end of the channel: the server is gone and the job goes with it."""
        try:
            message = self.channel.recv(65536)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            message = b""
        if not message:
            self._kill_all()
            return {"signal": signal.SIGKILL}
        message = json.loads(message)
        if message.get("kill"):
            self._kill_all()
        elif "signal" in message:
            self._forward(message["signal"])
        return None

    def _forward(self, sig):
        try:
            if self.pid_ns:
                os.kill(-1, sig)  # every process in our namespace but us
            else:
                os.killpg(self.command_pid, sig)
            if sig == signal.SIGTERM:  # a stopped process must run to act on its SIGTERM
                os.kill(-1, signal.SIGCONT) if self.pid_ns else os.killpg(self.command_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def _reap(self):
        """Reaps every child that has exited; returns the command's status once it has."""
        status = None
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status
            if pid == 0:
                return status
            if pid == self.command_pid:
                status = {"exit": os.WEXITSTATUS(code)} if os.WIFEXITED(code) else {"signal": os.WTERMSIG(code)}

    def _kill_all(self):
        """SIGKILL to every process of the job but us."""
        if self.pid_ns:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        try:
            os.killpg(self.command_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in _children(os.getpid()):  # what left the process group still ends up ours, as subreaper
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _end_everything(self):
        """The command has exited: whatever it left running ends with it, as a container's processes do."""
        while True:
            self._kill_all()
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


def _children(pid):
    """The pids of a process's children (none if it is gone)."""
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            children += [int(c) for c in _read(f"/proc/{pid}/task/{task}/children").split()]
        except OSError:
            pass
    return children


def _loopback_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


class Sandbox:
    """What confines every job on this server: the isolation mode, its cgroups, namespaces, user and environment."""

    def __init__(self, mode="auto", run_as=None, cgroup="auto", io_device=None, data_dir="."):
        self.mode = mode
        problems = []
        self.cgroups = None
        self.namespaces = []
        if mode != "off":
            if os.geteuid() != 0:
                problems.append("isolation needs root")
            else:
                try:
                    self.cgroups = Cgroups.detect(cgroup, io_device or block_device_of(data_dir))
                except OSError as e:
                    problems.append(f"cgroups: {e}")
                if self.cgroups is None:
                    problems.append("no usable cgroup hierarchy")
                else:
                    missing = {"cpu", "memory", "io", "pids"} - self.cgroups.controllers
                    if missing:
                        problems.append(f"cgroup {self.cgroups.version} lacks the {', '.join(sorted(missing))} "
                                        "controller(s)")
                    if not self.cgroups.io_device:
                        problems.append("no block device under the data directory: disk limits are unavailable")
                self.namespaces, missing_ns = _namespaces_available()
                problems += [f"{name} namespaces are unavailable" for name in missing_ns]
        if problems and mode == "on":
            if self.cgroups:
                self.cgroups.close()
            raise SystemExit("jobworker: --isolation on, but " + "; ".join(problems))
        for problem in problems:
            log.warning("isolation: %s", problem)
        self.namespace_flags = sum(NAMESPACES[name] for name in self.namespaces)
        user = pwd.getpwnam(run_as) if run_as else (pwd.getpwnam("nobody") if os.geteuid() == 0 else
                                                    pwd.getpwuid(os.geteuid()))
        if os.geteuid() != 0 and user.pw_uid != os.geteuid():
            raise SystemExit(f"jobworker: --run-as {run_as} needs the server to run as root")
        self.user, self.uid, self.gid = user.pw_name, user.pw_uid, user.pw_gid
        self.environment = {"PATH": JOB_PATH,
                            "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name,
                            "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
        log.info("isolation %s: cgroup %s (%s), namespaces %s, jobs run as %s", mode,
                 self.cgroups.version if self.cgroups else "none",
                 ", ".join(sorted(self.cgroups.controllers)) if self.cgroups else "-",
                 ", ".join(self.namespaces) or "none", self.user)

    @property
    def controllers(self):
        """The limits this server can enforce, by controller."""
        if not self.cgroups:
            return set()
        return self.cgroups.controllers - (set() if self.cgroups.io_device else {"io"})


def _namespaces_available():
    """Tries each namespace in a throwaway child: which of them can this host give a job?"""
    available, missing = [], []
    for name, flag in NAMESPACES.items():
        pid = os.fork()
        if pid == 0:
            os._exit(0 if _libc.unshare(flag) == 0 else 1)
        _, code = os.waitpid(pid, 0)
        (available if code == 0 else missing).append(name)
    return available, missing


# ---------------------------------------------------------------------------------------------------------------------
# Job manager
# ---------------------------------------------------------------------------------------------------------------------

def _enlarge_pipe(fd, size=1 << 20):
    """Fewer, larger reads for a job that writes a lot; returns the pipe's size."""
    try:
        return fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:  # over the host's pipe limits: a smaller pipe only costs throughput
        return fcntl.fcntl(fd, F_GETPIPE_SZ)


class OutputPump(threading.Thread):
    """One thread that moves every job's output from its pipes into its log, and notices when each init has exited.

    Event-driven over epoll: a job costs it nothing while it is quiet, and no job can hold it up. A pipe that gave
    less than BATCH bytes is left alone for QUIET seconds, so that a job writing in small pieces (most do: stdio
    writes 4-8 KiB) is taken in in large ones. Without that pause the pump races the job write for write: one wakeup
    per 8 KiB, and on a small machine that CPU comes out of the streams and of the job itself.
    """

    READ_SIZE = 1 << 20
    BATCH = 64 << 10
    QUIET = 0.001

    def __init__(self):
        super().__init__(name="output-pump", daemon=True)
        self._epoll = select.epoll()
        self._watched = {}  # fd -> (job, part, source, rests below); source is None for the init's end_fd
        self._resting = {}  # fd -> when it is watched again
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._epoll.register(self._stop_r, select.EPOLLIN)

    def watch(self, job, out_r, err_r):
        parts = ((out_r, "stdout", STDOUT), (err_r, "stderr", STDERR), (job.process.end_fd, "init", None))
        for fd, part, source in parts:
            # A pipe that could not be enlarged rests only when it is less than half full (else it would cap the job)
            rest_below = 0 if source is None else min(self.BATCH, _enlarge_pipe(fd) // 2)
            self._watched[fd] = (job, part, source, rest_below)
            self._epoll.register(fd, select.EPOLLIN)

    def run(self):
        name_this_thread()
        while True:
            timeout = max(0.0, min(self._resting.values()) - time.monotonic()) if self._resting else None
            for fd, _ in self._epoll.poll(timeout):
                if fd == self._stop_r:
                    return
                job, part, source, rest_below = self._watched[fd]
                try:
                    taken = source is not None and job.log.take_from(source, fd, self.READ_SIZE)
                    if taken:
                        if taken < rest_below:
                            self._epoll.modify(fd, 0)
                            self._resting[fd] = time.monotonic() + self.QUIET
                        continue
                except OSError as e:  # the disk is full, say: the job's writes now fail (EPIPE) and it ends
                    log.error("job %s: cannot keep its %s: %s", job.id, part, e)
                self._epoll.unregister(fd)
                del self._watched[fd]
                self._resting.pop(fd, None)  # a resting pipe still reports its hang-up
                if source is not None:
                    os.close(fd)  # the init's descriptors are its JobProcess's to release
                job.part_ended(part)
            if self._resting:
                now = time.monotonic()
                for fd in [fd for fd, when in self._resting.items() if when <= now]:
                    del self._resting[fd]
                    self._epoll.modify(fd, select.EPOLLIN)

    def stop(self):
        os.write(self._stop_w, b"x")
        self.join()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._epoll.close()


class LimitPolicy:
    """The server's defaults (applied where the client sets no limit) and maxima (refused above)."""

    def __init__(self, defaults=None, maxima=None, available=()):
        self.defaults = {name: 0 for name in LIMITS}
        self.defaults.update(defaults or {})
        self.maxima = {"cpu_cores": float(os.cpu_count() or 1), "memory_bytes": _memory_total(),
                       "io_read_bps": 0, "io_write_bps": 0, "pids": 32768}
        self.maxima.update(maxima or {})
        self.available = set(available)

    CONTROLLER = {"cpu_cores": "cpu", "memory_bytes": "memory", "io_read_bps": "io", "io_write_bps": "io", "pids": "pids"}

    def resolve(self, requested):
        """The limits a job gets, or JobError(INVALID_ARGUMENT / FAILED_PRECONDITION)."""
        limits = {}
        for name in LIMITS:
            value = requested.get(name, 0)
            if name == "cpu_cores" and (not math.isfinite(value) or value < 0):
                raise JobError("INVALID_ARGUMENT", f"cpu_cores must be a finite number >= 0, not {value}")
            if value and self.CONTROLLER[name] not in self.available:
                raise JobError("FAILED_PRECONDITION", f"{name} limits are not available on this server")
            maximum = self.maxima[name]
            if maximum and value > maximum:
                raise JobError("INVALID_ARGUMENT", f"{name} {value:g} exceeds this server's maximum of {maximum:g}")
            limits[name] = value or (self.defaults[name] if self.CONTROLLER[name] in self.available else 0)
        if limits["memory_bytes"] and limits["memory_bytes"] < (4 << 20):
            raise JobError("INVALID_ARGUMENT", "memory_bytes must be at least 4 MiB (the job's init needs some)")
        return limits


def _memory_total():
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


class JobManager:
    """Every job of this server: starts them, finds them, stops them, and ends them all at shutdown."""

    def __init__(self, data_dir, sandbox, policy):
        self.jobs_dir = os.path.join(data_dir, "jobs")
        _remove_tree(self.jobs_dir)  # logs of an earlier server's jobs: no job of ours can reach them
        os.makedirs(self.jobs_dir, mode=0o700)
        self.sandbox = sandbox
        self.policy = policy
        self.launcher = Launcher(sandbox, self.jobs_dir)
        self._pump = OutputPump()
        self._pump.start()
        self._jobs = {}  # id -> Job, oldest first
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._starting = 0
        self._closed = False

    def start(self, owner, command, limits):
        if not command or not command[0]:
            raise JobError("INVALID_ARGUMENT", "the command is empty")
        if any("\0" in arg for arg in command):
            raise JobError("INVALID_ARGUMENT", "the command contains a NUL byte, which no argument can hold")
        limits = self.policy.resolve(limits)
        with self._lock:
            if self._closed:
                raise JobError("UNAVAILABLE", "the server is shutting down")
            self._starting += 1  # shutdown waits for starts under way, so none escapes it
        try:
            slot, process, out_r, err_r = self.launcher.spawn(command, limits)
            job = Job(slot.id, owner, list(command), slot.log, process)
            with self._lock:
                self._jobs[job.id] = job
            self._pump.watch(job, out_r, err_r)
            return job
        finally:
            with self._lock:
                self._starting -= 1
                self._idle.notify_all()

    def get(self, job_id):
        return self._jobs.get(job_id)

    def jobs(self):
        """Every job, newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def stop(self, job, force=False, grace=DEFAULT_STOP_GRACE):
        """Ends `job` (SIGTERM, then SIGKILL after `grace` seconds) and returns once every process of it is gone."""
        if job.ended.is_set():
            return job
        job.stop_requested = True
        if not force:
            job.process.signal(signal.SIGTERM)
            if job.ended.wait(grace):
                return job
        job.process.kill()
        if not job.ended.wait(KILL_GRACE):
            job.process.kill_init()
        job.ended.wait()
        return job

    def shutdown(self, grace=SHUTDOWN_GRACE):
        """Stops every running job, waits for them, and releases everything the manager holds."""
        with self._lock:
            self._closed = True
            while self._starting:
                self._idle.wait()
        running = [job for job in self.jobs() if not job.ended.is_set()]
        for job in running:
            job.stop_requested = True
            job.process.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for job in running:
            if not job.ended.wait(max(0.0, deadline - time.monotonic())):
                job.process.kill()
        deadline = time.monotonic() + KILL_GRACE
        for job in running:
            if not job.ended.wait(max(0.0, deadline - time.monotonic())):
                job.process.kill_init()
        for job in running:
            job.ended.wait()
        self._pump.stop()
        self.launcher.close()
        if self.sandbox.cgroups:
            self.sandbox.cgroups.close()


def _remove_tree(path):
    if not os.path.lexists(path):
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(path)


# ---------------------------------------------------------------------------------------------------------------------
# Security: TLS, identity, roles
# ---------------------------------------------------------------------------------------------------------------------

# BoringSSL offers no minimum-version setting through gRPC Python; TLS 1.3 is enforced on every call (see Guard).
# What can be restricted is the TLS 1.2 cipher list, which gRPC reads from the environment when it loads.
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
                 "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305")
os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_CIPHERS

ROLES = ("admin", "user", "observer")
EVERY, OWN = "every job", "own jobs"

# Who may call what, and on whose jobs. A method missing here, or a role missing from its entry, is refused.
POLICY = {
    "Start": {"admin": EVERY, "user": OWN},
    "Stop": {"admin": EVERY, "user": OWN},
    "Query": {"admin": EVERY, "user": OWN, "observer": EVERY},
    "Stream": {"admin": EVERY, "user": OWN, "observer": EVERY},
    "List": {"admin": EVERY, "user": OWN, "observer": EVERY},
}
AUDITED = {"Start", "Stop"}

OID_CN, OID_OU = "2.5.4.3", "2.5.4.11"


class Denied(Exception):
    """A caller refused before its call runs; `code` is the gRPC status name."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Caller:
    """An authenticated caller: its identity (certificate CN), its role, and the jobs the current call may touch."""

    def __init__(self, identity, role, scope=None):
        self.identity, self.role, self.scope = identity, role, scope

    def may_see(self, job):
        return self.scope == EVERY or job.owner == self.identity


def _der(data, offset, end):
    """One strict DER element at `offset`, which must end by `end`: (tag, content start, content end)."""
    if offset + 2 > end:
        raise ValueError("truncated")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used in certificate names")
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or offset + count > end or data[offset] == 0:
            raise ValueError("bad length")
        length = int.from_bytes(data[offset:offset + count], "big")
        if length < 0x80:
            raise ValueError("non-minimal length")
        offset += count
    if offset + length > end:
        raise ValueError("truncated")
    return tag, offset, offset + length


def _der_children(data, start, end):
    while start < end:
        tag, content, start = _der(data, start, end)
        yield tag, content, start


def _oid(body):
    """The dotted form of a DER OBJECT IDENTIFIER, refusing any non-canonical encoding."""
    if not body or body[-1] & 0x80:
        raise ValueError("bad object identifier")
    arcs, value, fresh = [], 0, True
    for byte in body:
        if fresh and byte == 0x80:
            raise ValueError("non-minimal object identifier")
        value, fresh = (value << 7) | (byte & 0x7F), not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first] + arcs[1:]))


STRING_TYPES = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}


def subject_attributes(der):
    """[(OID, value)] of every attribute in the subject of a DER certificate, read strictly from its structure.

    Reading the structure, rather than the RFC 2253 string gRPC also offers, means no escaped comma, plus sign or
    equals sign in any value can pass for an attribute it is not. Any string type we cannot decode is refused.
    """
    tag, start, end = _der(der, 0, len(der))               # Certificate
    if tag != 0x30 or end != len(der):
        raise ValueError("not a certificate")
    tag, start, end = _der(der, start, end)                # TBSCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    fields = list(_der_children(der, start, end))
    if fields and fields[0][0] == 0xA0:                    # [0] version
        fields = fields[1:]
    if len(fields) < 5 or fields[4][0] != 0x30:            # serial, signature, issuer, validity, subject
        raise ValueError("not a certificate")
    attributes = []
    _, start, end = fields[4]
    for rdn_tag, rdn_start, rdn_end in _der_children(der, start, end):
        if rdn_tag != 0x31:
            raise ValueError("bad RDN")
        for atv_tag, atv_start, atv_end in _der_children(der, rdn_start, rdn_end):
            parts = list(_der_children(der, atv_start, atv_end))
            if atv_tag != 0x30 or len(parts) != 2 or parts[0][0] != 0x06:
                raise ValueError("bad attribute")
            (_, oid_start, oid_end), (value_tag, value_start, value_end) = parts
            if value_tag not in STRING_TYPES:
                raise ValueError(f"attribute string type 0x{value_tag:02x} is not accepted")
            value = bytes(der[value_start:value_end]).decode(STRING_TYPES[value_tag])  # strict
            attributes.append((_oid(der[oid_start:oid_end]), value))
    return attributes


def _pem_to_der(pem):
    import base64
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if text.count(begin) != 1 or end not in text:
        raise ValueError("expected one PEM certificate")
    return base64.b64decode(text.split(begin)[1].split(end)[0], validate=False)


_identities = {}


def identify(pem):
    """Caller(identity, role) from a client certificate in PEM form, or Denied. Exactly one CN and one role OU."""
    cached = _identities.get(pem)
    if cached is not None:
        return cached
    try:
        attributes = subject_attributes(memoryview(_pem_to_der(pem)))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise Denied("UNAUTHENTICATED", f"unreadable client certificate: {e}") from None
    names = [value for oid, value in attributes if oid == OID_CN]
    units = [value for oid, value in attributes if oid == OID_OU]
    if len(names) != 1 or not names[0]:
        raise Denied("UNAUTHENTICATED", "the client certificate must name exactly one CN")
    if len(units) != 1 or units[0] not in ROLES:
        found = ", ".join(repr(u) for u in units) or "none"
        raise Denied("PERMISSION_DENIED", f"the client certificate must carry exactly one role OU "
                                          f"({', '.join(ROLES)}); it has {found}")
    caller = Caller(names[0], units[0])
    if len(_identities) > 1024:
        _identities.clear()
    _identities[pem] = caller
    return caller


def authorize(method, auth_context):
    """The one place that decides whether a call may run: TLS 1.3, a readable identity, and POLICY."""
    if auth_context.get("transport_security_type") != [b"ssl"]:
        raise Denied("UNAUTHENTICATED", "mutual TLS is required")
    if auth_context.get("ssl_tls_version") != [b"TLSv1.3"]:
        raise Denied("UNAUTHENTICATED", "TLS 1.3 is required")
    certificates = auth_context.get("x509_pem_cert")
    if not certificates:
        raise Denied("UNAUTHENTICATED", "a client certificate is required")
    caller = identify(certificates[0])
    scope = POLICY.get(method, {}).get(caller.role)
    if scope is None:
        verb = method.lower()
        raise Denied("PERMISSION_DENIED", f"{caller.role}s cannot {verb} jobs" if method in POLICY
                     else f"{method} is not allowed")
    return Caller(caller.identity, caller.role, scope)


def check_tls_files(cert, key, ca):
    """Exits with a message naming the file unless cert and key are a matching PEM pair and ca holds a certificate.

    gRPC would only say, later, that it could not bind; Python's own TLS library reads the same files strictly.
    """
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for path in (cert, key, ca):
        try:
            _read_bytes(path)
        except OSError as e:
            raise SystemExit(f"jobworker: cannot read {path}: {e.strerror}") from None
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise SystemExit(f"jobworker: {cert} and {key} are not a certificate and its private key in PEM: "
                         f"{e.reason or e}") from None
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise SystemExit(f"jobworker: {ca} holds no CA certificate in PEM: {e.reason or e}") from None


def check_address(addr):
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SystemExit(f"jobworker: {addr!r} is not HOST:PORT with a port from 0 to 65535")


def server_credentials(cert, key, ca):
    return grpc.ssl_server_credentials([(_read_bytes(key), _read_bytes(cert))], root_certificates=_read_bytes(ca),
                                       require_client_auth=True)


def channel_credentials(cert, key, ca):
    return grpc.ssl_channel_credentials(root_certificates=_read_bytes(ca), private_key=_read_bytes(key),
                                        certificate_chain=_read_bytes(cert))


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class Audit:
    """One JSON line per start and stop, to the audit file and the server log: who, what, when, result."""

    def __init__(self, path):
        self._file = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def record(self, caller, action, result, **details):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "who": caller.identity if caller else None,
                 "role": caller.role if caller else None, "action": action, "result": result, **details}
        line = json.dumps(entry, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
        log.info("audit %s", line)

    def close(self):
        self._file.close()


# ---------------------------------------------------------------------------------------------------------------------
# gRPC servicer
# ---------------------------------------------------------------------------------------------------------------------

def _job_id(text):
    try:
        if str(uuid.UUID(text)) == text:
            return text
    except ValueError:
        pass
    raise JobError("INVALID_ARGUMENT", f"not a job id (a lower-case UUID): {text[:64]!r}")


class Servicer:
    """The JobWorker RPCs. Each receives the Caller that Guard has authorized."""

    def __init__(self, manager, stream_slots):
        self.manager = manager
        self.stream_slots = stream_slots

    def _visible(self, job_id, caller):
        job = self.manager.get(_job_id(job_id))
        if job is None or not caller.may_see(job):
            raise JobError("NOT_FOUND", f"no job {job_id}")  # the same answer whether it exists or not
        return job

    def Start(self, request, context, caller):
        limits = {name: getattr(request.limits, name) for name in LIMITS}
        context.add_callback(self.manager.launcher.refill)  # once the answer has gone
        job = self.manager.start(caller.identity, list(request.command), limits)
        return pb.StartResponse(job_id=job.id, status=job.status())

    def Stop(self, request, context, caller):
        job = self._visible(request.job_id, caller)
        grace = request.timeout_seconds if request.HasField("timeout_seconds") else DEFAULT_STOP_GRACE
        if not math.isfinite(grace) or not 0 <= grace <= MAX_STOP_GRACE:
            raise JobError("INVALID_ARGUMENT", f"timeout_seconds must be between 0 and {MAX_STOP_GRACE:g}")
        return self.manager.stop(job, force=request.force, grace=grace).status()

    def Query(self, request, context, caller):
        return self._visible(request.job_id, caller).status()

    def List(self, request, context, caller):
        return pb.ListResponse(jobs=[job.status() for job in self.manager.jobs() if caller.may_see(job)])

    def Stream(self, request, context, caller):
        job = self._visible(request.job_id, caller)
        if request.offset > job.log.size and job.ended.is_set():  # a running job may still get there
            raise JobError("OUT_OF_RANGE", f"offset {request.offset} is past the {job.log.size} bytes of output")
        self.stream_slots.take(caller.identity)
        reader = LogReader(job.log, request.offset)

        def ended():  # however the call ends; a client that has gone away wakes and ends its reader
            reader.cancel()
            self.stream_slots.give_back(caller.identity)
        if not context.add_callback(ended):
            ended()
        return self._stream(job, reader)

    @staticmethod
    def _stream(job, reader):
        for source, offset, data in reader:
            yield encode_output(source, offset, data)
        if not reader.cancelled:
            yield pb.StreamResponse(offset=reader.offset, status=job.status())


def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_output(source, offset, data):
    """A StreamResponse carrying (non-empty) output, serialized: the bytes pb.StreamResponse(...).SerializeToString()
    would be.

    Streams spend their time copying: a message object would take a copy of every chunk and serializing it another;
    this takes one. Fields in number order, zero values left out, as protobuf writes them (a test holds it to that).
    """
    source_field = b"\x08" + _varint(source) if source else b""
    offset_field = b"\x18" + _varint(offset) if offset else b""
    return b"".join((source_field, b"\x12", _varint(len(data)), data, offset_field))


def _serialize(response):
    """A response message serialized; one that already is (encode_output) as it is."""
    return response if type(response) is bytes else response.SerializeToString()


class Guard:
    """Runs every RPC behind authorize(), so no call reaches the Servicer unchecked, and audits starts and stops.

    It builds the service's handlers itself from the proto's service descriptor (the equivalent of an interceptor),
    so a streaming call is refused before its first byte, and a method without a POLICY entry cannot be served.
    """

    def __init__(self, servicer, audit):
        self.servicer, self.audit = servicer, audit

    def handler(self):
        service = pb.DESCRIPTOR.services_by_name["JobWorker"]
        handlers = {}
        for method in service.methods:
            if method.name not in POLICY:
                raise RuntimeError(f"RPC {method.name} has no entry in POLICY")
            make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = make(
                self._guarded(method.name, getattr(self.servicer, method.name)),
                request_deserializer=_lenient(getattr(pb, method.input_type.name)),
                response_serializer=_serialize)
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _guarded(self, method, implementation):
        audited = method in AUDITED

        def guarded(request, context):
            caller = None
            try:
                caller = authorize(method, context.auth_context())
                if isinstance(request, Malformed):
                    raise JobError("INVALID_ARGUMENT", request.error)
                response = implementation(request, context, caller)
            except (Denied, JobError) as e:
                if audited:
                    self._audit(method, caller or _peer_caller(context), request, e.code, str(e))
                context.abort(getattr(grpc.StatusCode, e.code), str(e))
            if audited:
                self._audit(method, caller, request, "OK", job_id=getattr(response, "job_id", request_job(request)))
            return response
        return guarded

    def _audit(self, method, caller, request, result, message=None, job_id=None):
        details = {"job_id": job_id or request_job(request)}
        if method == "Start" and not isinstance(request, Malformed):
            details["command"] = list(request.command)[:64]
        if method == "Stop" and not isinstance(request, Malformed):
            details["force"] = request.force
        if message:
            details["error"] = message
        self.audit.record(caller, method.lower(), result, **details)


class Malformed:
    """A request that could not be decoded; the Guard answers it with INVALID_ARGUMENT (gRPC itself says INTERNAL)."""

    def __init__(self, error):
        self.error = error


def _lenient(message_class):
    def parse(data):
        try:
            return message_class.FromString(data)
        except Exception as e:  # protobuf's DecodeError, and invalid UTF-8 in a string field
            return Malformed(f"cannot decode the {message_class.__name__}: {e}")
    return parse


def request_job(request):
    return getattr(request, "job_id", None) or None


def _peer_caller(context):
    """Who a refused caller claimed to be, for the audit log, if its certificate says."""
    names = context.auth_context().get("x509_common_name")
    return Caller(names[0].decode(errors="replace"), None) if names else None


class ElasticExecutor:
    """The server's thread pool: a thread per call in flight, up to `workers`; a thread idle for `idle` seconds exits.

    gRPC's sync server runs each call on a pool thread, and a stream holds its thread for as long as it lasts. The
    standard ThreadPoolExecutor never lets a thread go, so one burst of streams would leave its threads for good.
    """

    def __init__(self, workers, idle=5.0):
        import queue
        from concurrent.futures import Future
        self._queue, self._empty, self._future = queue.SimpleQueue(), queue.Empty, Future
        self._workers, self._idle_timeout = workers, idle
        self._lock = threading.Lock()
        self._threads = self._idle = self._pending = 0
        self._closed = False

    def submit(self, fn, *args, **kwargs):
        future = self._future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is shut down")
            self._queue.put((future, fn, args, kwargs))
            self._pending += 1
            if self._pending > self._idle and self._threads < self._workers:
                self._threads += 1
                self._idle += 1
                threading.Thread(target=self._work, name="rpc", daemon=True).start()
        return future

    def _work(self):
        name_this_thread()
        while True:
            try:
                item = self._queue.get(timeout=self._idle_timeout)
            except self._empty:
                with self._lock:
                    if self._pending == 0:  # under the lock, so a call submitted now starts another thread
                        self._threads -= 1
                        self._idle -= 1
                        return
                continue
            with self._lock:
                self._pending -= 1
                self._idle -= 1
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)
            del item, future, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait=True, cancel_futures=False):
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._queue.put(None)
                self._pending += 1


class StreamSlots:
    """A cap on streams in flight, in all and per caller, so that streams cannot take the threads other calls need."""

    def __init__(self, total, per_caller):
        self.total, self.per_caller = total, per_caller
        self._open = {}  # identity -> its streams open
        self._all = 0
        self._lock = threading.Lock()

    def take(self, identity):
        with self._lock:
            if self._all >= self.total or self._open.get(identity, 0) >= self.per_caller:
                raise JobError("RESOURCE_EXHAUSTED", "too many streams open; close some and try again")
            self._open[identity] = self._open.get(identity, 0) + 1
            self._all += 1

    def give_back(self, identity):
        with self._lock:
            self._all -= 1
            self._open[identity] -= 1
            if not self._open[identity]:
                del self._open[identity]


class Server:
    """The gRPC server: mutual TLS on one address, the Guard in front of the Servicer, the JobManager behind it."""

    WORKERS = 1024
    RESERVED = 64  # threads streams may not take, for the other calls

    def __init__(self, addr, cert, key, ca, data_dir, sandbox, policy):
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.manager = JobManager(data_dir, sandbox, policy)
        self.audit = Audit(os.path.join(data_dir, "audit.log"))
        options = [("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0),
                   ("grpc.http2.bdp_probe", 0),  # else a client's oversized request grows our receive window first
                   # A client that vanished without closing its connection is found out within 20 s, and the call
                   # (and the thread) it held is released.
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        self._grpc = grpc.server(ElasticExecutor(self.WORKERS), options=options, maximum_concurrent_rpcs=self.WORKERS)
        streams = self.WORKERS - self.RESERVED
        servicer = Servicer(self.manager, StreamSlots(streams, streams // 2))
        self._grpc.add_generic_rpc_handlers((Guard(servicer, self.audit).handler(),))
        try:
            self.port = self._grpc.add_secure_port(addr, server_credentials(cert, key, ca))
        except RuntimeError as e:
            self.manager.shutdown()
            raise SystemExit(f"jobworker: cannot listen on {addr}: {e}") from None
        self._grpc.start()

    def shutdown(self):
        """Stops taking calls, stops every job, and waits for the in-flight calls (their streams end with the jobs)."""
        stopped = self._grpc.stop(grace=SHUTDOWN_GRACE + 5)
        self.manager.shutdown()
        stopped.wait()
        self.audit.close()


# ---------------------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------------------

class Client:
    """A connection to a jobworker server, with the calls a script needs."""

    def __init__(self, addr, cert, key, ca):
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.secure_channel(addr, channel_credentials(cert, key, ca), options=options)
        self.stub = pb_grpc.JobWorkerStub(self.channel)

    def close(self):
        self.channel.close()

    def start(self, command, **limits):
        return self.stub.Start(pb.StartRequest(command=command, limits=pb.Limits(**limits))).job_id

    def stop(self, job_id, force=False, timeout=None):
        request = pb.StopRequest(job_id=job_id, force=force)
        if timeout is not None:
            request.timeout_seconds = timeout
        return self.stub.Stop(request)

    def query(self, job_id):
        return self.stub.Query(pb.QueryRequest(job_id=job_id))

    def list(self):
        return list(self.stub.List(pb.ListRequest()).jobs)

    def stream(self, job_id, offset=0, retries=8):
        """Yields StreamResponses from `offset`; reconnects with backoff and resumes after the last byte received."""
        failures = 0
        while True:
            try:
                for message in self.stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset)):
                    failures = 0
                    offset = message.offset + len(message.data)
                    yield message
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or failures >= retries:
                    raise
                failures += 1
                time.sleep(min(0.1 * 2 ** failures, 5.0))  # backoff before reconnecting


def status_exit_code(status):
    """The exit status `ssh host cmd` would give: the command's own, or 128+N if signal N ended it."""
    if status.HasField("exit_code"):
        return status.exit_code
    return 128 + status.signal if status.signal else 255


def describe(status):
    """A short human-readable form of a JobStatus."""
    state = pb.JobState.Name(status.state)
    if status.HasField("exit_code"):
        how = f"exit {status.exit_code}"
    elif status.signal:
        how = f"signal {status.signal} ({signal.Signals(status.signal).name})"
    else:
        how = f"pid {status.pid}"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.started_at.seconds))
    return (f"{status.job_id}  {state:<10} {how:<20} {status.owner:<12} {started}  "
            f"{status.output_bytes:>10}B  {' '.join(status.command)}")


def to_json(message):
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
CERTS = os.path.join(HERE, "certs")


def _connection_flags(parser, role_default="admin"):
    env = os.environ.get
    parser.add_argument("--addr", default=env("JOBWORKER_ADDR", "127.0.0.1:7777"), help="server HOST:PORT")
    parser.add_argument("--cert", default=env("JOBWORKER_CERT", os.path.join(CERTS, f"{role_default}.pem")))
    parser.add_argument("--key", default=env("JOBWORKER_KEY", os.path.join(CERTS, f"{role_default}.key")))
    parser.add_argument("--ca", default=env("JOBWORKER_CA", os.path.join(CERTS, "ca.pem")))


def _limit_option(text):
    name, _, value = text.partition("=")
    parse = {"cpu": float, "memory": parse_size, "io-read-bps": parse_size, "io-write-bps": parse_size, "pids": int}
    if name not in parse:
        raise argparse.ArgumentTypeError(f"unknown limit {name!r} (one of {', '.join(parse)})")
    try:
        return {"cpu": "cpu_cores", "memory": "memory_bytes", "io-read-bps": "io_read_bps",
                "io-write-bps": "io_write_bps", "pids": "pids"}[name], parse[name](value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser():
    parser = argparse.ArgumentParser(prog="jobworker.py", description="Run Linux commands for remote clients, safely.")
    commands = parser.add_subparsers(dest="action", required=True, metavar="{serve,start,stop,query,stream,list}")

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--addr", default="127.0.0.1:7777")
    serve.add_argument("--cert", default=os.path.join(CERTS, "server.pem"))
    serve.add_argument("--key", default=os.path.join(CERTS, "server.key"))
    serve.add_argument("--ca", default=os.path.join(CERTS, "ca.pem"), help="the CA that signs client certificates")
    serve.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    serve.add_argument("--isolation", choices=("on", "off", "auto"), default="auto")
    serve.add_argument("--run-as", metavar="USER", help="user the jobs run as (default: nobody when root)")
    serve.add_argument("--cgroup", choices=("auto", "v1", "v2"), default="auto", help="which cgroup hierarchy to use")
    serve.add_argument("--io-device", metavar="MAJ:MIN", help="device for disk limits (default: the data dir's disk)")
    serve.add_argument("--default", dest="defaults", action="append", type=_limit_option, default=[],
                       metavar="LIMIT=VALUE", help="a default limit: cpu, memory, io-read-bps, io-write-bps, pids")
    serve.add_argument("--max", dest="maxima", action="append", type=_limit_option, default=[],
                       metavar="LIMIT=VALUE", help="a maximum a client may ask for")

    start = commands.add_parser("start", help="start a job and print its id")
    _connection_flags(start)
    start.add_argument("--cpu", type=float, default=0.0, metavar="CORES")
    start.add_argument("--memory", type=_size, default=0, metavar="SIZE")
    start.add_argument("--io-read-bps", type=_size, default=0, metavar="N")
    start.add_argument("--io-write-bps", type=_size, default=0, metavar="N")
    start.add_argument("--pids", type=int, default=0, metavar="N")
    start.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    stop = commands.add_parser("stop", help="stop a job")
    _connection_flags(stop)
    stop.add_argument("--force", action="store_true", help="SIGKILL at once")
    stop.add_argument("--timeout", type=float, metavar="SECONDS", help="grace period before SIGKILL (default 10)")
    stop.add_argument("--json", action="store_true")
    stop.add_argument("job_id", metavar="JOB_ID")

    query = commands.add_parser("query", help="show a job's status")
    _connection_flags(query)
    query.add_argument("--json", action="store_true")
    query.add_argument("job_id", metavar="JOB_ID")

    stream = commands.add_parser("stream", help="write a job's output, then exit with its status")
    _connection_flags(stream)
    stream.add_argument("--offset", type=int, default=0, metavar="N")
    stream.add_argument("job_id", metavar="JOB_ID")

    listing = commands.add_parser("list", help="list the jobs you may see")
    _connection_flags(listing)
    listing.add_argument("--json", action="store_true")
    return parser


def serve(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    _raise_fd_limit()
    check_tls_files(args.cert, args.key, args.ca)
    check_address(args.addr)
    try:
        os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
        probe = os.path.join(args.data_dir, ".writable")
        _write(probe, "")
        os.unlink(probe)
    except OSError as e:
        raise SystemExit(f"jobworker: the data directory {args.data_dir} is not writable: {e.strerror}") from None
    sandbox = Sandbox(args.isolation, args.run_as, args.cgroup, args.io_device, args.data_dir)
    policy = LimitPolicy(dict(args.defaults), dict(args.maxima), sandbox.controllers)
    # Blocked before any thread starts, so every thread inherits the mask and only sigwait() below takes them: a
    # Python handler would run only when the main thread next runs bytecode, and it may be blocked on a lock.
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    server = Server(args.addr, args.cert, args.key, args.ca, args.data_dir, sandbox, policy)
    log.info("serving on %s (data in %s)", args.addr, args.data_dir)
    print(f"listening on port {server.port}", flush=True)
    sig = signal.sigwait(SHUTDOWN_SIGNALS)
    log.info("%s: stopping every job", signal.Signals(sig).name)
    server.shutdown()
    log.info("stopped")
    return 0


SHUTDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _raise_fd_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # each running job holds a few descriptors


def run_client(args):
    for path in (args.cert, args.key, args.ca):
        if not os.path.exists(path):
            raise SystemExit(f"jobworker: {path} does not exist (run `make cert`, or pass --cert/--key/--ca)")
    client = Client(args.addr, args.cert, args.key, args.ca)
    try:
        return CLIENT_ACTIONS[args.action](client, args)
    finally:
        client.close()


def cli_start(client, args):
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("jobworker: start needs a command: start [OPTIONS] -- CMD [ARG...]")
    print(client.start(command, cpu_cores=args.cpu, memory_bytes=args.memory, io_read_bps=args.io_read_bps,
                       io_write_bps=args.io_write_bps, pids=args.pids))
    return 0


def cli_stop(client, args):
    status = client.stop(args.job_id, force=args.force, timeout=args.timeout)
    print(to_json(status) if args.json else describe(status))
    return 0


def cli_query(client, args):
    status = client.query(args.job_id)
    print(to_json(status) if args.json else describe(status))
    return 0


def cli_list(client, args):
    jobs = client.list()
    if args.json:
        print(to_json(pb.ListResponse(jobs=jobs)))
    else:
        for status in jobs:
            print(describe(status))
    return 0


def cli_stream(client, args):
    outputs = {pb.StreamResponse.STDOUT: sys.stdout.buffer.fileno(), pb.StreamResponse.STDERR: sys.stderr.buffer.fileno()}
    for message in client.stream(args.job_id, args.offset):
        if message.data:
            _write_all(outputs[message.source], message.data)
        if message.HasField("status"):
            return status_exit_code(message.status)
    raise SystemExit("jobworker: the stream ended without the job's status")


CLIENT_ACTIONS = {"start": cli_start, "stop": cli_stop, "query": cli_query, "stream": cli_stream, "list": cli_list}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.action == "serve":
            return serve(args)
        return run_client(args)
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 141  # our reader went away, as with any Unix tool writing to a closed pipe
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
