#!/usr/bin/env python3
"""jobworker: run Linux commands for remote clients, safely.

A client with a certificate starts a job, stops it (gracefully or by force), queries its status and streams its
output, live and from the first byte, while other clients do the same. The service speaks gRPC over mutual TLS and
decides what each caller may do from the role (OU) in its certificate. Each job runs in its own cgroup and PID, mount,
network, IPC and cgroup namespaces, under a small init of ours, as a transient user of its own.

    python jobworker.py serve                      # the service
    python jobworker.py run -- CMD [ARG...]        # the client: run, start, stop, query, stream, wait, list, remove

The file reads the way a request travels: security (TLS, identity, roles), the gRPC server and its RPCs, the job
manager (with each job's record on disk, which outlives the server, and the retention of ended jobs), isolation, the
inits that run each job (the one part that runs outside the server), the job's output on its way from the pipes to
the disk and back to the streams, and finally the client and the command line.
"""

import bisect
import contextlib
import ctypes
import enum
import errno
import fcntl
import grp
import importlib
import json
import math
import os
import pwd
import select
import signal
import socket
import struct
import sys
import time
from stat import S_IMODE, S_ISLNK, S_ISREG


class _ImportedOnFirstUse:
    """A module imported the first time one of its names is used."""

    def __init__(self, name):
        self._name, self._module = name, None

    def __getattr__(self, attr):
        if self._module is None:  # kept: importlib's own look-up costs microseconds at every use
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


# Every job's init is forked from the launcher, a bare interpreter that loads this file and uses only the modules
# imported above. What the server alone needs is imported on first use, so that the launcher never loads it: grpc and
# protobuf would make every init bigger, and threading's fork handlers would run in every fork.
grpc = _ImportedOnFirstUse("grpc")
pb = _ImportedOnFirstUse("gen.jobworker_pb2")
pb_grpc = _ImportedOnFirstUse("gen.jobworker_pb2_grpc")
json_format = _ImportedOnFirstUse("google.protobuf.json_format")
resource = _ImportedOnFirstUse("resource")
argparse = _ImportedOnFirstUse("argparse")
futures = _ImportedOnFirstUse("concurrent.futures")
hashlib = _ImportedOnFirstUse("hashlib")
logging = _ImportedOnFirstUse("logging")
shutil = _ImportedOnFirstUse("shutil")
shlex = _ImportedOnFirstUse("shlex")
ssl = _ImportedOnFirstUse("ssl")
subprocess = _ImportedOnFirstUse("subprocess")
threading = _ImportedOnFirstUse("threading")
unicodedata = _ImportedOnFirstUse("unicodedata")
uuid = _ImportedOnFirstUse("uuid")

VERSION = "1.0.0"
LIMITS = ("cpu_cores", "memory_bytes", "io_read_bps", "io_write_bps", "pids")
UINT64_MAX = (1 << 64) - 1
MAX_REQUEST_BYTES = 4 * 1024 * 1024
STREAM_CHUNK = 256 * 1024          # bytes of output in one Stream message
DEFAULT_STOP_GRACE = 10.0          # seconds between SIGTERM and SIGKILL when the client does not say
MAX_STOP_GRACE = 3600.0
SHUTDOWN_GRACE = 5.0               # the same, for the jobs still running when the server shuts down
KILL_GRACE = 5.0                   # seconds an init has to carry out a kill before it is killed itself
DEFAULT_KEEP_JOBS = 1000           # ended jobs kept, with their output (serve --keep-jobs)
DEFAULT_KEEP_FOR = 7 * 86400.0     # seconds an ended job is kept (serve --keep-for)
DEFAULT_MAX_OUTPUT = 1 << 30       # bytes of output kept per job; the rest is dropped and counted (serve --max-output)
DEFAULT_MIN_FREE = "2%"            # free space in the data directory under which Starts are refused (serve --min-free)
DEFAULT_MAX_RUNNING = 100          # jobs a non-admin caller may have running at once (serve --max-running-per-caller)
LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE = 100, 1000
LIST_COMMAND_BYTES = 1024          # of each command List shows, so that a page stays small (Query shows all of it)


class Refused(Exception):
    """A request the service refuses; `code` names its gRPC status, so that the layers below need no grpc."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def parse_duration(text):
    """'90', '90s', '15m', '12h', '7d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use seconds or an s/m/h/d suffix)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {text!r}")
    return seconds


def shutting_down():
    return Refused("UNAVAILABLE", "the server is shutting down")


def parse_size(text):
    """'4096', '512K', '100M', '2G', '1T' -> bytes (binary multiples), at most UINT64_MAX."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    digits = text.rstrip("KMGT")
    unit = text[len(digits):]
    if not digits.isdigit() or unit not in units:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G/T suffix)")
    size = int(digits) * units[unit]
    if size > UINT64_MAX:
        raise ValueError(f"{text} is more than {UINT64_MAX} bytes")
    return size


# ---------------------------------------------------------------------------------------------------------------------
# Linux: the system calls Python lacks, and the messages between the server and its inits
# Standard library only: the launcher and every init use this section too.
# ---------------------------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = \
    0x00020000, 0x02000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x20, 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = -100, 0x8000, 0x1, 0x2
PR_SET_DUMPABLE, PR_SET_NAME, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = \
    4, 15, 24, 22, 38, 36
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def libc(function, *args):
    """Calls a libc function; raises OSError as Python's own wrappers do."""
    result = getattr(_libc, function)(*args)
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{function}: {os.strerror(code)}")
    return result


def syscall(name, *args):
    """A system call libc has no wrapper for, by its number on this machine; raises OSError."""
    result = _libc.syscall(SYSCALLS[os.uname().machine][name], *args)
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")
    return result


# Numbers of the system calls used by number: for syscall(), and for the filter that refuses user namespaces (the
# native ones, and those of the 32-bit ABI the same kernel also runs, by their audit architecture).
SYSCALLS = {
    "x86_64": {"mount_setattr": 442, "keyctl": 250},
    "aarch64": {"mount_setattr": 442, "keyctl": 219},
}
AUDIT_ARCHES = {  # machine -> [(audit architecture, (unshare, clone, clone3))]
    "x86_64": [(0xC000003E, (272, 56, 435)), (0x40000003, (310, 120, 435))],
    "aarch64": [(0xC00000B7, (97, 220, 435)), (0x40000028, (337, 120, 435))],
}
X32_SYSCALL_BIT = 0x40000000
KEYCTL_JOIN_SESSION_KEYRING = 1
SECCOMP_MODE_FILTER, SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 2, 0x80000000, 0x50000, 0x7FFF0000
BPF_LD_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06


def no_user_namespaces_filter(machine):
    """A seccomp program by which unshare() and clone() asking for a new user namespace fail with EPERM. clone3(),
    whose flags are in memory a filter cannot read, fails with ENOSYS, after which the C library falls back to clone().
    A system call of an ABI the filter does not know kills the process, so that no other numbering slips past it."""
    program = [(BPF_LD_ABS, 4, None, None)]  # seccomp_data.arch
    for arch, _ in AUDIT_ARCHES[machine]:
        program.append((BPF_JEQ, arch, f"arch {arch}", None))
    program.append((BPF_RET, SECCOMP_RET_KILL_PROCESS, None, None))
    for arch, (unshare, clone, clone3) in AUDIT_ARCHES[machine]:
        program += [f"arch {arch}", (BPF_LD_ABS, 0, None, None)]  # seccomp_data.nr
        if arch == 0xC000003E:
            program.append((BPF_JGE, X32_SYSCALL_BIT, "ENOSYS", None))  # x32's numbers: not for jobs
        program += [(BPF_JEQ, clone3, "ENOSYS", None), (BPF_JEQ, unshare, "flags", None),
                    (BPF_JEQ, clone, "flags", None), (BPF_RET, SECCOMP_RET_ALLOW, None, None)]
    program += ["flags", (BPF_LD_ABS, 16, None, None),  # the low half of seccomp_data.args[0]: the flags
                (BPF_JSET, CLONE_NEWUSER, "EPERM", None), (BPF_RET, SECCOMP_RET_ALLOW, None, None),
                "ENOSYS", (BPF_RET, SECCOMP_RET_ERRNO | errno.ENOSYS, None, None),
                "EPERM", (BPF_RET, SECCOMP_RET_ERRNO | errno.EPERM, None, None)]
    labels, instructions = {}, []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)
    return b"".join(struct.pack("HBBI", code, labels[true] - i - 1 if true else 0, labels[false] - i - 1 if false
                                else 0, k) for i, (code, k, true, false) in enumerate(instructions))


def protect_mounts(attributes):
    """Sets MOUNT_ATTR_* `attributes` on every mount of this mount namespace; each keeps the others it has."""
    mount_attr = ctypes.create_string_buffer(struct.pack("QQQQ", attributes, 0, 0, 0), 32)
    syscall("mount_setattr", AT_FDCWD, b"/", AT_RECURSIVE, mount_attr, 32)


def install_seccomp_filter(program):
    """Installs a seccomp program on this thread, and so on everything it runs from now on (no_new_privs is set)."""
    filters = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(filters))  # struct sock_fprog
    libc("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.create_string_buffer(fprog, len(fprog)), 0, 0)


def name_this_thread(name):
    """Shows a thread's name in ps, top and /proc."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class Message(str, enum.Enum):
    """What the server, the launcher and an init say to each other, in the order they say it."""
    ORDER = "order"      # server -> launcher: fork an init (with its channel, and how to isolate it)
    INIT = "init"        # init -> server: here I am (with a pidfd of the init)
    READY = "ready"      # init -> server: in my cgroup and namespaces, waiting for a job
    FAILED = "failed"    # init -> server: what could not be done, at which stage (after which the init exits)
    JOB = "job"          # server -> init: run this (with the job's spec, its stdout and its stderr)
    STARTED = "started"  # init -> server: the command runs (with a pidfd of the command)
    NOTED = "noted"      # server -> init: the command's pid is known; it may be reaped from now on
    SIGNAL = "signal"    # server -> init: send this signal to every process of the job (SIGKILL: kill them all)
    ENDED = "ended"      # init -> server: how the command ended; every process of the job ends next, then the init


def send(sock, kind, fds=(), flags=0, **fields):
    """One message on a SOCK_SEQPACKET socket: a JSON object, with descriptors the peer receives copies of."""
    socket.send_fds(sock, [json.dumps({"kind": kind.value, **fields}).encode()], list(fds), flags)


def receive(sock, max_fds=0):
    """The next message on a SOCK_SEQPACKET socket as (kind, fields, fds); (None, {}, []) at its end."""
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, 65536, max_fds, socket.MSG_CMSG_CLOEXEC)
            break
        except ConnectionResetError:  # the peer left messages of ours unread; its own are still queued
            continue
    if not data and not fds:
        return None, {}, []
    try:
        fields = json.loads(data)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or not isinstance(fields, dict):
            raise ValueError("cut short, or not an object")
        return Message(fields.pop("kind")), fields, fds
    except (ValueError, KeyError) as e:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, f"unreadable message: {e}") from None


def children_of(pid):
    """The pids of a process's children, in every one of its threads (none if it is gone)."""
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        with contextlib.suppress(OSError):
            children += [int(child) for child in _read(f"/proc/{pid}/task/{task}/children").split()]
    return children


def _read(path):
    with open(path) as f:
        return f.read()


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------------------------------------------------------------
# Security: who the caller is (its certificate, over mutual TLS 1.3) and what its role lets it do; the data directory
# A method missing from POLICY, or a role missing from its entry, is refused; so is a data directory not ours alone.
# ---------------------------------------------------------------------------------------------------------------------

ROLES = ("admin", "user", "observer")


class Scope(enum.Enum):
    """Which jobs a call may touch."""
    EVERY = "every job"
    OWN = "own jobs"


POLICY = {
    "Start": {"admin": Scope.EVERY, "user": Scope.OWN},
    "Stop": {"admin": Scope.EVERY, "user": Scope.OWN},
    "Query": {"admin": Scope.EVERY, "user": Scope.OWN, "observer": Scope.EVERY},
    "Stream": {"admin": Scope.EVERY, "user": Scope.OWN, "observer": Scope.EVERY},
    "List": {"admin": Scope.EVERY, "user": Scope.OWN, "observer": Scope.EVERY},
    "Wait": {"admin": Scope.EVERY, "user": Scope.OWN, "observer": Scope.EVERY},
    "Remove": {"admin": Scope.EVERY, "user": Scope.OWN},
}
AUDITED = {"Start", "Stop", "Remove"}  # audited when they succeed too; every refused call of any RPC is
OID_CN, OID_OU = "2.5.4.3", "2.5.4.11"
# BoringSSL offers no minimum-version setting through gRPC Python, so TLS 1.3 is checked on every call (authenticate);
# what can be restricted is the TLS 1.2 cipher list, which gRPC reads from the environment.
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
                 "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305")


class Caller:
    """A caller, as its client certificate says: its identity (the certificate's whole subject, as subject_string
    writes it, which owns the jobs it starts), its role, the SHA-256 fingerprint of the certificate (for the audit
    log), and the jobs the current call may touch."""

    def __init__(self, identity, role, fingerprint=None, scope=None):
        self.identity, self.role, self.fingerprint, self.scope = identity, role, fingerprint, scope

    def may_see(self, job):
        return self.scope is Scope.EVERY or job.owner == self.identity


def authenticate(auth_context):
    """The Caller a call comes from: over TLS 1.3, with a client certificate that is a usable identity (identify)."""
    if auth_context.get("transport_security_type") != [b"ssl"]:
        raise Refused("UNAUTHENTICATED", "mutual TLS is required")
    if auth_context.get("ssl_tls_version") != [b"TLSv1.3"]:
        raise Refused("UNAUTHENTICATED", "TLS 1.3 is required")
    certificates = auth_context.get("x509_pem_cert")
    if not certificates:
        raise Refused("UNAUTHENTICATED", "a client certificate is required")
    return identify(certificates[0])


def authorize(method, caller):
    """The one place that decides whether an authenticated caller's call may run (POLICY): sets the jobs it may
    touch."""
    caller.scope = POLICY.get(method, {}).get(caller.role)
    if caller.scope is None:
        raise Refused("PERMISSION_DENIED", f"{caller.role}s cannot {method.lower()} jobs" if method in POLICY
                      else f"{method} is not allowed")


def identify(pem):
    """Caller(identity, role, fingerprint) from a client certificate in PEM form: its subject must hold exactly one
    CN, not blank, and exactly one role OU; and the certificate must not be a CA's, which could sign others."""
    der = _der_of(pem)
    try:
        rdns, is_ca = read_certificate(memoryview(der))
    except (ValueError, IndexError) as e:
        raise Refused("UNAUTHENTICATED", f"unreadable client certificate: {e}") from None
    if is_ca:
        raise Refused("UNAUTHENTICATED", "the client certificate is a CA's (basicConstraints CA:TRUE), which is no "
                                         "caller's identity")
    attributes = [attribute for rdn in rdns for attribute in rdn]
    names = [value for oid, value in attributes if oid == OID_CN]
    units = [value for oid, value in attributes if oid == OID_OU]
    if len(names) != 1:
        raise Refused("UNAUTHENTICATED", "the client certificate must name exactly one CN")
    if not names[0].strip():
        raise Refused("UNAUTHENTICATED", "the client certificate's CN is blank")
    if len(units) != 1 or units[0] not in ROLES:
        found = ", ".join(repr(unit) for unit in units) or "none"
        raise Refused("PERMISSION_DENIED", f"the client certificate must carry exactly one role OU "
                                           f"({', '.join(ROLES)}); it has {found}")
    return Caller(subject_string(rdns), units[0], fingerprint_of(der))


def _der_of(pem):
    try:
        return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    except ValueError as e:  # not ASCII, not PEM, not base64
        raise Refused("UNAUTHENTICATED", f"unreadable client certificate: {e}") from None


def fingerprint_of(der):
    """The SHA-256 fingerprint of a DER certificate, in hex: what `openssl x509 -fingerprint -sha256` shows."""
    return hashlib.sha256(der).hexdigest()


# The attribute types a subject string names (RFC 4514's); any other is written as its dotted OID.
ATTRIBUTE_NAMES = {OID_CN: "CN", OID_OU: "OU", "2.5.4.10": "O", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
                   "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID"}


def subject_string(rdns):
    """A subject as one string, for no other subject the same: its RDNs in the certificate's order (as openssl shows
    them) joined by ',', the attributes of a multi-valued RDN sorted and joined by '+', each TYPE=value with RFC 4514's
    escaping, so that no value can pass for another attribute or RDN: 'O=jobworker,OU=user,CN=alice'."""
    return ",".join("+".join(sorted(f"{ATTRIBUTE_NAMES.get(oid, oid)}={_escaped(value)}" for oid, value in rdn))
                    for rdn in rdns)


def _escaped(value):
    """An attribute value as RFC 4514 writes it: a backslash before each special character, a leading '#' or space
    and a trailing space; NUL as \\00."""
    last = len(value) - 1
    return "".join("\\00" if c == "\0" else "\\" + c if c in '\\"+,;<>=' or (i == 0 and c in "# ") or
                   (i == last and c == " ") else c for i, c in enumerate(value))


STRING_TYPES = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}
OID_BASIC_CONSTRAINTS = "2.5.29.19"


def read_certificate(der):
    """What a DER certificate says of its holder, read strictly from its structure: (its subject, as a list of RDNs
    each a list of (OID, value); whether its basicConstraints extension says it is a CA's).

    Reading the structure, rather than the RFC 2253 string gRPC also offers, means no escaped comma, plus sign or
    equals sign in any value can pass for an attribute it is not. A string type we cannot decode is refused, and so
    are extensions out of order, one that appears twice, and a basicConstraints that is not DER.
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
    if len(fields) < 6 or fields[4][0] != 0x30:            # serial, signature, issuer, validity, subject, key
        raise ValueError("not a certificate")
    optional = [tag for tag, _, _ in fields[6:]]           # [1] issuerUniqueID, [2] subjectUniqueID, [3] extensions
    if optional != sorted(set(optional)) or not set(optional) <= {0x81, 0x82, 0xA3}:
        raise ValueError("not a certificate")
    extensions = [(start, end) for tag, start, end in fields[6:] if tag == 0xA3]
    return _rdns(der, *fields[4][1:]), bool(extensions) and _says_ca(der, *extensions[0])


def _rdns(der, start, end):
    rdns = []
    for rdn_tag, rdn_start, rdn_end in _der_children(der, start, end):
        if rdn_tag != 0x31:
            raise ValueError("bad RDN")
        rdn = []
        for atv_tag, atv_start, atv_end in _der_children(der, rdn_start, rdn_end):
            parts = list(_der_children(der, atv_start, atv_end))
            if atv_tag != 0x30 or len(parts) != 2 or parts[0][0] != 0x06:
                raise ValueError("bad attribute")
            (_, oid_start, oid_end), (value_tag, value_start, value_end) = parts
            if value_tag not in STRING_TYPES:
                raise ValueError(f"attribute string type 0x{value_tag:02x} is not accepted")
            value = bytes(der[value_start:value_end]).decode(STRING_TYPES[value_tag])  # strict
            rdn.append((_oid(der[oid_start:oid_end]), value))
        if not rdn:
            raise ValueError("empty RDN")
        rdns.append(rdn)
    return rdns


def _says_ca(der, start, end):
    """Whether the extensions (the content of TBSCertificate's [3]) hold a basicConstraints that says cA."""
    children = list(_der_children(der, start, end))  # exactly one: the SEQUENCE of extensions
    if len(children) != 1 or children[0][0] != 0x30:
        raise ValueError("bad extensions")
    _, start, end = children[0]
    seen, ca = set(), False
    for tag, ext_start, ext_end in _der_children(der, start, end):
        parts = list(_der_children(der, ext_start, ext_end))  # extnID, critical (DER omits FALSE), extnValue
        if tag != 0x30 or not 2 <= len(parts) <= 3 or parts[0][0] != 0x06 or parts[-1][0] != 0x04 or \
                (len(parts) == 3 and not _is_true(der, parts[1])):
            raise ValueError("bad extension")
        oid = _oid(der[parts[0][1]:parts[0][2]])
        if oid in seen:
            raise ValueError(f"extension {oid} appears twice")
        seen.add(oid)
        if oid == OID_BASIC_CONSTRAINTS:
            ca = _basic_constraints_ca(der, *parts[-1][1:])
    return ca


def _basic_constraints_ca(der, start, end):
    """cA of a DER BasicConstraints, SEQUENCE { cA BOOLEAN DEFAULT FALSE, pathLenConstraint INTEGER OPTIONAL }."""
    tag, content, content_end = _der(der, start, end)
    if tag != 0x30 or content_end != end:
        raise ValueError("bad basicConstraints")
    parts = list(_der_children(der, content, content_end))
    ca = bool(parts) and parts[0][0] == 0x01
    if ca and not _is_true(der, parts[0]):  # DER omits a FALSE that is the default
        raise ValueError("bad basicConstraints")
    rest = parts[1:] if ca else parts
    if len(rest) > 1 or (rest and rest[0][0] != 0x02):
        raise ValueError("bad basicConstraints")
    return ca


def _is_true(der, element):
    """Whether a DER element is the BOOLEAN TRUE (DER has one encoding of it: 0xFF)."""
    tag, start, end = element
    return tag == 0x01 and bytes(der[start:end]) == b"\xff"


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


def server_credentials(cert, key, ca):
    os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_CIPHERS
    return grpc.ssl_server_credentials([(_read_bytes(key), _read_bytes(cert))], root_certificates=_read_bytes(ca),
                                       require_client_auth=True)


def channel_credentials(cert, key, ca):
    os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_CIPHERS
    return grpc.ssl_channel_credentials(root_certificates=_read_bytes(ca), private_key=_read_bytes(key),
                                        certificate_chain=_read_bytes(cert))


def check_tls_files(cert, key, ca):
    """Exits with a message naming the file unless cert and key are a matching PEM pair and ca holds a certificate.

    gRPC would only say, later, that it could not bind; Python's own TLS library reads the same files strictly.
    """
    for path in (cert, key, ca):
        check_readable(path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise SystemExit(f"jobworker: {cert} and {key} are not a certificate and its private key in PEM: "
                         f"{e.reason or e}") from None
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise SystemExit(f"jobworker: {ca} holds no CA certificate in PEM: {e.reason or e}") from None


def check_readable(path):
    try:
        _read_bytes(path)
    except OSError as e:
        raise SystemExit(f"jobworker: cannot read {path}: {e.strerror}") from None


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class DataDirectory:
    """The data directory and its jobs directory, each opened once, as this server's user's alone: owned by it, not
    writable by group or others, not a symbolic link (else SystemExit, naming why). Every file in them is then opened,
    made and removed relative to these descriptors (open_file, opened_directory, dir_fd=), never through a symbolic
    link, so that nobody else can point the server's writes and removals at other files."""

    def __init__(self, path):
        self.path = path
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            self.fd = self._trusted(path, None, path)
            with contextlib.suppress(FileExistsError):
                os.mkdir("jobs", 0o700, dir_fd=self.fd)
            self.jobs = self._trusted("jobs", self.fd, os.path.join(path, "jobs"))
            self._check_writable()
        except OSError as e:
            raise SystemExit(f"jobworker: the data directory {path} is not usable: {e.strerror}") from None

    @staticmethod
    def _trusted(name, dir_fd, shown):
        """A descriptor of the directory `name` (in `dir_fd`), if it is this user's alone; else SystemExit, saying why
        (`shown`: its path)."""
        try:
            fd = open_directory(os.path.normpath(name), dir_fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            fd, problem = None, "is a symbolic link"
        else:
            found = os.fstat(fd)
            problem = (f"is owned by uid {found.st_uid}, not by this server's (uid {os.geteuid()})"
                       if found.st_uid != os.geteuid() else
                       f"is writable by group or others (mode {S_IMODE(found.st_mode):04o})"
                       if found.st_mode & 0o022 else None)
        if problem:
            if fd is not None:
                os.close(fd)
            raise SystemExit(f"jobworker: {shown} {problem}; the data directory and its jobs directory must be the "
                             f"server's user's alone")
        return fd

    def _check_writable(self):
        probe = ".writable"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe, dir_fd=self.fd)  # one a killed server left
        os.close(open_file(self.fd, probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.unlink(probe, dir_fd=self.fd)


def open_file(directory, name, flags, mode=0o600):
    """A descriptor of the regular file `name` in `directory` (a descriptor), opened with `flags`, never through a
    symbolic link (OSError ELOOP); anything else there (a FIFO, whose open would block, a device) is refused too."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=directory)
    except OSError as e:
        raise _said_of_a_link(e, name, directory) from None
    if not S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{name} is not a regular file")
    return fd


def open_directory(name, directory=None):
    """A descriptor of the directory `name` (in `directory`, a descriptor, if given), never opened through a symbolic
    link (OSError ELOOP)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError as e:
        raise _said_of_a_link(e, name, directory) from None


@contextlib.contextmanager
def opened_directory(directory, name):
    """The directory `name` in `directory` (a descriptor), opened for a with block (see open_directory)."""
    fd = open_directory(name, directory)
    try:
        yield fd
    finally:
        os.close(fd)


def _said_of_a_link(error, name, directory):
    """An open's OSError, saying so when it was refused because `name` is a symbolic link (which O_NOFOLLOW makes
    ELOOP, and O_DIRECTORY ENOTDIR)."""
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        with contextlib.suppress(OSError):
            if S_ISLNK(os.lstat(name, dir_fd=directory).st_mode):
                return OSError(errno.ELOOP, f"{name} is a symbolic link, which is not followed")
    return error


# ---------------------------------------------------------------------------------------------------------------------
# gRPC server: mutual TLS on one address, every call behind the Guard; starts, stops, removes and refusals audited
# The RPCs themselves are the Servicer's, in the next section.
# ---------------------------------------------------------------------------------------------------------------------

class Server:
    """The gRPC server, its thread pool, and the JobManager behind it."""

    # Every call holds a thread while it runs (a stream or a wait, for as long as it lasts). Other callers than admins
    # share CALLS of them for unary calls and LONG_CALLS for streams and waits; admins may take ADMIN_SHARE more of
    # each, so that they can always List and Stop. The four add up to WORKERS, the most gRPC lets in at once.
    WORKERS = 1024
    CALLS = LONG_CALLS = 480
    ADMIN_SHARE = 32
    HANDSHAKE_TIMEOUT_MS = 5000  # for a connection's TLS handshake and HTTP/2 settings (gRPC's default: 120 s)

    def __init__(self, addr, cert, key, ca, data_dir, sandbox, policy, **keeping):
        self.audit = Audit(data_dir)
        try:
            self.manager = JobManager(data_dir, sandbox, policy, **keeping)
            try:
                self._serve(addr, cert, key, ca)
            except BaseException:  # nothing the manager started (launcher, inits, threads) outlives a failed start
                self.manager.shutdown()
                raise
        except BaseException:
            self.audit.close()
            raise

    def _serve(self, addr, cert, key, ca):
        options = [("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0),
                   ("grpc.http2.bdp_probe", 0),  # else a client's oversized request grows our receive window first
                   # A client that vanished without closing its connection is found out within 70 s, and the call
                   # (and the thread) it held is released. A live client on a loaded host may take tens of seconds
                   # to answer a ping: cutting it off sooner would end its streams.
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 60_000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   # Connections that never finish their handshake go within seconds, and connections past half of
                   # our descriptors are closed as they come: the other half is kept for jobs, their logs and pipes.
                   ("grpc.server_handshake_timeout_ms", self.HANDSHAKE_TIMEOUT_MS),
                   ("grpc.max_allowed_incoming_connections", resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)]
        pool = futures.ThreadPoolExecutor(self.WORKERS, initializer=name_this_thread, initargs=("rpc",))
        self._grpc = grpc.server(pool, options=options, maximum_concurrent_rpcs=self.WORKERS)
        servicer = Servicer(self.manager, CallSlots("calls in flight", self.CALLS, self.ADMIN_SHARE),
                            CallSlots("streams and waits open", self.LONG_CALLS, self.ADMIN_SHARE))
        self._grpc.add_generic_rpc_handlers((Guard(servicer, self.audit).handler(),))
        try:
            self.port = self._grpc.add_secure_port(addr, server_credentials(cert, key, ca))
        except RuntimeError as e:
            raise SystemExit(f"jobworker: cannot listen on {addr}: {e}") from None
        self._grpc.start()

    def shutdown(self):
        """Stops taking calls, stops every job, and waits for the calls in flight (their streams end with the jobs)."""
        stopped = self._grpc.stop(grace=SHUTDOWN_GRACE + KILL_GRACE)
        self.manager.shutdown()
        stopped.wait()
        self.audit.close()


class Guard:
    """Runs every RPC behind authenticate() and authorize(), so no call reaches the Servicer unchecked, and audits the
    starts, stops and removes that succeed and every call refused.

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
            make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler)
            handlers[method.name] = make(self._guarded(method.name, getattr(self.servicer, method.name)),
                                         request_deserializer=_lenient(getattr(pb, method.input_type.name)),
                                         response_serializer=lambda response: response.SerializeToString())
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _guarded(self, method, implementation):
        def guarded(request, context):
            caller = None
            try:
                caller = authenticate(context.auth_context())
                authorize(method, caller)
                if isinstance(request, Malformed):
                    raise Refused("INVALID_ARGUMENT", request.error)
                response = implementation(request, context, caller)
            except Refused as e:
                code, message = e.code, str(e)
            except Exception:  # a bug: the caller gets a status, the log gets the traceback
                logging.exception("%s failed", method)
                code, message = "INTERNAL", f"{method} failed; the server's log says why"
            else:
                if method in AUDITED:
                    self.audit.record(method, caller, request, "OK", job_id=getattr(response, "job_id", None))
                return response
            self.audit.record(method, caller or _claimed_caller(context), request, code, error=message)
            context.abort(getattr(grpc.StatusCode, code), message)
        return guarded


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


def _claimed_caller(context):
    """Who a caller refused before it was identified claimed to be, for the audit log: the fingerprint of its
    certificate, and its subject as far as it can be read."""
    certificates = context.auth_context().get("x509_pem_cert")
    if not certificates:
        return None
    try:
        der = _der_of(certificates[0])
    except Refused:
        return None
    try:
        identity = subject_string(read_certificate(memoryview(der))[0])
    except (ValueError, IndexError):
        identity = None
    return Caller(identity, None, fingerprint_of(der))


AUDIT_TEXT_BYTES = 1024  # of each text a client sent (a command, a directory, a job id) that an audit entry keeps


class Audit:
    """One JSON line per start, stop and remove that succeeds, and per call of any RPC that is refused, as far as
    RefusalLimit lets each caller's refusals be written; appended to the audit file (mode 0600, kept across
    restarts) and the server's log. Whatever a client sent is kept to its first AUDIT_TEXT_BYTES (a command with
    its length and SHA-256 too), so that one call's entry stays small whatever the call."""

    def __init__(self, data_dir):
        try:
            fd = open_file(data_dir.fd, "audit.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.fchmod(fd, 0o600)  # one left readable (by hand, say) is readable no more
        except OSError as e:
            raise SystemExit(f"jobworker: cannot open the audit log in {data_dir.path}: {e.strerror}") from None
        self._file = open(fd, "a", buffering=1)
        self._limit = RefusalLimit()
        self._lock = threading.Lock()

    def record(self, method, caller, request, result, job_id=None, error=None):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": method.lower(),
                 "who": caller.identity if caller else None, "role": caller.role if caller else None,
                 "fingerprint": caller.fingerprint if caller else None, "result": result,
                 "job_id": _cut_text(job_id or getattr(request, "job_id", None) or None)}
        if method == "Start" and not isinstance(request, Malformed):
            entry.update(_command_summary(request.command))
            entry["env"] = _cut_texts(sorted(request.env))  # the names only: values may be secrets
            entry["working_directory"] = _cut_text(request.working_directory)
        if method == "Stop" and not isinstance(request, Malformed):
            entry["force"] = request.force
        if error:
            entry["error"] = _cut_text(error)
        with self._lock:
            if result != "OK":
                written, entry["unwritten_before"], forgotten = self._limit.take(
                    (entry["fingerprint"], entry["who"]), time.monotonic())
                for who in forgotten:
                    self._write(self._summary(*who))
                if not written:
                    return
            self._write(entry)

    @staticmethod
    def _summary(fingerprint, who, count):
        """An entry for the refusals of a caller that were not written, once no later entry of its will say so."""
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": "unwritten refusals",
                "who": who, "fingerprint": fingerprint, "unwritten_before": count}

    def _write(self, entry):
        line = json.dumps(entry, sort_keys=True)
        try:
            self._file.write(line + "\n")
        except (OSError, ValueError) as e:  # a full disk, or closed at shutdown: the server's log still has it
            logging.error("cannot write the audit log: %s", e)
        logging.info("audit %s", line)

    def close(self):
        with self._lock:
            for who in self._limit.counts():
                self._write(self._summary(*who))
            self._file.close()


def _command_summary(command):
    """A command for the audit log: its first AUDIT_TEXT_BYTES (as List cuts a command), and the length and SHA-256
    of the whole of it as the kernel holds it (each argument in UTF-8, then a NUL: /proc/PID/cmdline)."""
    digest, size = hashlib.sha256(), 0
    for arg in command:
        encoded = arg.encode() + b"\0"
        digest.update(encoded)
        size += len(encoded)
    return {"command": _cut_texts(command), "command_bytes": size, "command_sha256": digest.hexdigest()}


def _cut_texts(texts):
    """Texts cut to AUDIT_TEXT_BYTES in all: whole ones while they fit, then part of one (never inside a
    character)."""
    room, kept = AUDIT_TEXT_BYTES, []
    for text in texts:
        encoded = text.encode()
        if len(encoded) > room:
            kept.append(encoded[:room].decode(errors="ignore"))
            break
        kept.append(text)
        room -= len(encoded)
    return kept


def _cut_text(text):
    return None if text is None else text.encode()[:AUDIT_TEXT_BYTES].decode(errors="ignore")


class RefusalLimit:
    """How many of each caller's refused calls the audit writes: a token bucket per certificate, which lets BURST be
    written at once and RATE a second after that, so that no caller can fill the disk with its refusals, nor hide
    another's among them. The refusals not written are counted, and the count goes in the caller's next entry that
    is written. CALLERS are tracked at most (bounded memory): the least recently refused is forgotten first, its
    count, if any, then written in a summary entry, as every count left at shutdown is."""

    BURST, RATE, CALLERS = 20, 1.0, 1024

    def __init__(self):
        self._buckets = {}  # caller -> [tokens, when last counted, refusals not written], least recently refused first

    def take(self, caller, now):
        """A refusal of `caller`'s: (whether it is written, how many of its refusals before it were not, and the
        [(caller..., count)] of the callers forgotten to make room, whose counts are not written yet)."""
        forgotten = []
        bucket = self._buckets.pop(caller, None)
        if bucket is None:
            bucket = [float(self.BURST), now, 0]
            while len(self._buckets) >= self.CALLERS:
                oldest = next(iter(self._buckets))
                if self._buckets[oldest][2]:
                    forgotten.append((*oldest, self._buckets[oldest][2]))
                del self._buckets[oldest]
        self._buckets[caller] = bucket  # now the most recently refused
        tokens, bucket[1] = min(self.BURST, bucket[0] + (now - bucket[1]) * self.RATE), now
        if tokens < 1:
            bucket[0], bucket[2] = tokens, bucket[2] + 1
            return False, 0, forgotten
        unwritten, bucket[0], bucket[2] = bucket[2], tokens - 1, 0
        return True, unwritten, forgotten

    def counts(self):
        """[(caller..., count)] of every caller with refusals not written yet; forgets them."""
        counts = [(*caller, bucket[2]) for caller, bucket in self._buckets.items() if bucket[2]]
        self._buckets.clear()
        return counts


class CallSlots:
    """Calls in flight, by caller, within a total, so that no caller can take the threads the others need. A caller
    may hold at most half of the slots the other callers leave free: two callers never hold them all, nor does any
    small number of them, and whoever comes next finds room. Admins may take `admin_share` slots more."""

    def __init__(self, what, total, admin_share):
        self.what, self.total, self.admin_share = what, total, admin_share
        self._held = {}  # identity -> its calls in flight
        self._in_flight = 0
        self._lock = threading.Lock()

    def take(self, caller):
        with self._lock:
            own = self._held.get(caller.identity, 0)
            left = self.total + (self.admin_share if caller.role == "admin" else 0) - (self._in_flight - own)
            if 2 * own >= left:
                raise Refused("RESOURCE_EXHAUSTED", f"{caller.identity} has {own} {self.what}, half of the {left} the "
                                                    f"other callers leave free (a caller may hold no more): end some "
                                                    f"and try again")
            self._held[caller.identity] = own + 1
            self._in_flight += 1

    def give_back(self, caller):
        with self._lock:
            self._in_flight -= 1
            self._held[caller.identity] -= 1
            if not self._held[caller.identity]:
                del self._held[caller.identity]

    @contextlib.contextmanager
    def held(self, caller):
        self.take(caller)
        try:
            yield
        finally:
            self.give_back(caller)


# ---------------------------------------------------------------------------------------------------------------------
# RPCs: each receives the Caller the Guard has authorized, checks the request, and asks the JobManager
# ---------------------------------------------------------------------------------------------------------------------

def _unary_call(method):
    """A Servicer's RPC that holds one of its caller's slots of `calls` while it runs."""
    def held(self, request, context, caller):
        with self.calls.held(caller):
            return method(self, request, context, caller)
    return held


class Servicer:
    """The JobWorker RPCs. Each holds one of its caller's slots while it runs: a slot of `calls`, or of `long_calls`
    for the calls that last as long as a job (Stream, Wait)."""

    def __init__(self, manager, calls, long_calls):
        self.manager = manager
        self.calls, self.long_calls = calls, long_calls

    @_unary_call
    def Start(self, request, context, caller):
        limits = {name: getattr(request.limits, name) for name in LIMITS}
        # The pool makes the next init, and the job's record goes to the disk, once this answer has gone, so that
        # neither competes with the Start for the CPU or the disk.
        if not context.add_callback(self.manager.pool.refill):  # the call has ended already
            self.manager.pool.refill()
        job = self.manager.start(caller.identity, list(request.command), limits, dict(request.env),
                                 request.working_directory or self.manager.sandbox.working_directory,
                                 capped=caller.role != "admin")
        if not context.add_callback(lambda: self.manager.sync(job)):
            self.manager.sync(job)
        return pb.StartResponse(job_id=job.id, status=job.status())

    @_unary_call
    def Stop(self, request, context, caller):
        job = self._visible(request.job_id, caller)
        grace = request.timeout_seconds if request.HasField("timeout_seconds") else DEFAULT_STOP_GRACE
        if not math.isfinite(grace) or not 0 <= grace <= MAX_STOP_GRACE:
            raise Refused("INVALID_ARGUMENT", f"timeout_seconds must be between 0 and {MAX_STOP_GRACE:g}")
        self.manager.stop(job, grace=0.0 if request.force else grace)
        self._until_ended(job, context)
        return job.status()

    @_unary_call
    def Query(self, request, context, caller):
        return self._visible(request.job_id, caller).status()

    @_unary_call
    def List(self, request, context, caller):
        size = request.page_size or LIST_PAGE_SIZE
        if size > MAX_LIST_PAGE_SIZE:
            raise Refused("INVALID_ARGUMENT", f"page_size must be at most {MAX_LIST_PAGE_SIZE}")
        if request.state not in pb.JobState.values():
            raise Refused("INVALID_ARGUMENT", f"no job state {request.state}")
        state = pb.JobState.Name(request.state) if request.state else None
        token = request.page_token
        if token and not (token.isascii() and token.isdigit() and len(token) < 20):
            raise Refused("INVALID_ARGUMENT", f"not a page token of this server: {token[:64]!r}")

        def wanted(job):
            return (caller.may_see(job) and (not request.owner or job.owner == request.owner)
                    and (state is None or job.state == state))
        jobs, more = self.manager.page(wanted, int(token) if token else None, size)
        response = pb.ListResponse(jobs=[_cut_command(job.status()) for job in jobs])
        if more:
            response.next_page_token = str(jobs[-1].number)
        return response

    @_unary_call
    def Remove(self, request, context, caller):
        job = self._visible(request.job_id, caller)
        self.manager.remove(job)
        return job.status()

    def Stream(self, request, context, caller):
        job = self._visible(request.job_id, caller)
        if job.outcome and request.offset > job.log.size:  # a running job may still get there
            raise Refused("OUT_OF_RANGE", f"offset {request.offset} is past the {job.log.size} bytes of output")
        self.long_calls.take(caller)
        reader = LogReader(job.log, request.offset)

        def ended():  # however the call ends; a client that has gone away wakes its reader, which ends
            reader.cancel()
            self.long_calls.give_back(caller)
        if not context.add_callback(ended):
            ended()
        return self._stream(job, reader, context)

    def Wait(self, request, context, caller):
        job = self._visible(request.job_id, caller)
        if job.ended.is_set():
            return job.status()
        with self.long_calls.held(caller):
            self._until_ended(job, context)
        return job.status()

    @staticmethod
    def _until_ended(job, context):
        """Returns once the job has ended, or the call has (its client cancelled, its deadline passed, it went away),
        when what is returned goes nowhere."""
        woken = threading.Event()
        if context.add_callback(woken.set):
            job.wait(woken)

    @staticmethod
    def _stream(job, reader, context):
        for source, offset, data in reader:
            yield pb.StreamResponse(source=source, offset=offset, data=data)
        if job.log.removed:  # by a Remove or by retention: its output is gone, and the stream cannot be whole
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {job.id} was removed while it was streamed")
        if not reader.cancelled:
            yield pb.StreamResponse(offset=reader.offset, status=job.status())

    def _visible(self, job_id, caller):
        try:
            valid = str(uuid.UUID(job_id)) == job_id
        except ValueError:
            valid = False
        if not valid:
            raise Refused("INVALID_ARGUMENT", f"not a job id (a lower-case UUID): {job_id[:64]!r}")
        job = self.manager.get(job_id)
        if job is None or not caller.may_see(job):
            raise Refused("NOT_FOUND", f"no job {job_id[:64]}")  # the same answer whether it exists or not
        return job


def _cut_command(status):
    """A listed status: its command cut to LIST_COMMAND_BYTES (whole arguments while they fit, then part of one)."""
    room, kept = LIST_COMMAND_BYTES, []
    for arg in status.command:
        encoded = arg.encode()
        if len(encoded) > room:
            kept.append(encoded[:room].decode(errors="ignore"))  # no character cut in half
            del status.command[:]
            status.command.extend(kept)
            status.command_truncated = True
            break
        kept.append(arg)
        room -= len(encoded)
    return status


# ---------------------------------------------------------------------------------------------------------------------
# Job manager: every job of this server, from its Start to its end and its removal, and all of them at shutdown
# A job is a command run by an init of its own, its output log, how it ended, and its record on disk, from which a
# later server knows it. Ended jobs are kept within the retention's bounds.
# ---------------------------------------------------------------------------------------------------------------------

class JobManager:
    """Starts jobs in ready inits, finds them, stops them, removes them (asked, or past the retention's bounds), and
    ends them all at shutdown. Each job's record is written at its Start and at its end; the jobs of earlier servers
    are loaded from theirs."""

    def __init__(self, data_dir, sandbox, policy, retention=None, max_output=DEFAULT_MAX_OUTPUT,
                 min_free=DEFAULT_MIN_FREE, max_running=DEFAULT_MAX_RUNNING):
        jobs_dir = data_dir.jobs  # a descriptor: see DataDirectory
        self.sandbox, self.policy = sandbox, policy
        self.retention = retention or Retention()
        self.space = DiskSpace(os.path.join(data_dir.path, "jobs"), min_free)
        self.max_running = max_running
        self._running = {}  # owner -> its jobs running (and Starts under way)
        self._jobs = {}   # id -> Job, in the order they started
        self._numbered = 0
        self._lock = threading.Lock()
        self._no_start_under_way = threading.Condition(self._lock)
        self._retention_due = threading.Condition(self._lock)
        self._starting = 0
        self._closed = False
        restored = load_jobs(jobs_dir)  # before any init of ours makes a directory there
        # id -> Job, of those ended, in the order they ended: retention removes the first first
        self._ended = {job.id: job for job in sorted(restored, key=lambda job: job.outcome.ended_at)}
        with self._lock:
            for job in sorted(restored, key=lambda job: job.started_at):
                self._add(job)
        self.pool = InitPool(sandbox, jobs_dir)
        # One job's teardown (cgroup reads and removal, the init's release) never holds up another job's output.
        self._teardown = futures.ThreadPoolExecutor(1, initializer=name_this_thread, initargs=("teardown",))
        self._pump = OutputPump(lambda job: self._teardown.submit(self._finish, job), max_output, self.space)
        self._syncer = futures.ThreadPoolExecutor(1, initializer=name_this_thread, initargs=("records",))
        self._retainer = threading.Thread(target=self._retain, name="retention", daemon=True)
        self._retainer.start()
        self._stopper = Stopper()

    def start(self, owner, command, limits, env, working_directory, capped=True):
        """Starts a job: `env` holds the client's variables, on top of the base environment. `capped`: refused
        (RESOURCE_EXHAUSTED) if its owner has max_running jobs running already."""
        if not command or not command[0]:
            raise Refused("INVALID_ARGUMENT", "the command is empty")
        if any("\0" in arg for arg in command):
            raise Refused("INVALID_ARGUMENT", "the command contains a NUL byte, which no argument can hold")
        check_variables(env)
        if not working_directory.startswith("/") or "\0" in working_directory:
            raise Refused("INVALID_ARGUMENT", f"the working directory must be an absolute path, not "
                                              f"{working_directory[:256]!r}")
        limits = self.policy.resolve(limits)
        self.space.check()
        with self._under_way(), self._running_place(owner, capped):
            try:
                init = self.pool.take()
                with contextlib.ExitStack() as undo:  # everything a failed Start must release, in reverse order
                    undo.callback(init.discard)
                    out_r, err_r = init.start(command, limits, {**self.sandbox.environment, **env}, working_directory)
                    undo.callback(os.close, out_r)
                    undo.callback(os.close, err_r)
                    job = Job.started(init, owner, command, env, working_directory)
                    job.save(synced=False)  # RUNNING: should the server crash, the next one finds the job LOST
                    self._pump.watch(job, out_r, err_r)
                    undo.pop_all()
            except OSError as e:
                full = e.errno in (errno.ENOSPC, errno.EDQUOT)
                raise Refused("RESOURCE_EXHAUSTED" if full else "UNAVAILABLE", f"cannot start the job: {e}") from None
            with self._lock:
                self._add(job)
        return job

    def sync(self, job):
        """Flushes a Start's record to the disk, on a thread of its own, once the Start has answered."""
        try:
            self._syncer.submit(self._sync, job)
        except RuntimeError:  # the manager has shut down since
            self._sync(job)

    @staticmethod
    def _sync(job):
        if not job.ended.is_set():  # else its final record, synced, has replaced it: a short job costs no flush more
            sync_record(job.log)

    def _add(self, job):
        """Numbers a job, for List's pages, and takes it in (under the lock)."""
        self._numbered += 1
        job.number = self._numbered
        self._jobs[job.id] = job
        if job.ended.is_set():  # it ended before it was added: _finish did not find it
            self._has_ended(job)

    def _has_ended(self, job):
        """Counts an ended job for retention (under the lock)."""
        self._ended[job.id] = job
        self._retention_due.notify()

    @contextlib.contextmanager
    def _under_way(self):
        """Counts a Start in flight, which shutdown waits for, so that no job escapes it."""
        with self._lock:
            if self._closed:
                raise shutting_down()
            self._starting += 1
        try:
            yield
        finally:
            with self._lock:
                self._starting -= 1
                self._no_start_under_way.notify_all()

    @contextlib.contextmanager
    def _running_place(self, owner, capped):
        """Counts a Start among its owner's running jobs (uncounted when the job ends, or now if the Start fails)."""
        with self._lock:
            running = self._running.get(owner, 0)
            if capped and running >= self.max_running:
                raise Refused("RESOURCE_EXHAUSTED", f"{owner} has {running} jobs running, the most a caller may have "
                                                    f"at once on this server: wait for one to end, or stop one")
            self._running[owner] = running + 1
        try:
            yield
        except BaseException:
            with self._lock:
                self._not_running(owner)
            raise

    def _not_running(self, owner):
        """Uncounts one of an owner's running jobs (under the lock)."""
        self._running[owner] -= 1
        if not self._running[owner]:
            del self._running[owner]

    def get(self, job_id):
        return self._jobs.get(job_id)

    def jobs(self):
        """Every job, newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def page(self, wanted, before, count):
        """Up to `count` jobs that `wanted` accepts, newest first, of those numbered below `before` (None: all); and
        whether more follow."""
        with self._lock:
            jobs = list(self._jobs.values())
        if before is not None:
            jobs = jobs[:bisect.bisect_left(jobs, before, key=lambda job: job.number)]
        found = []
        for job in reversed(jobs):
            if wanted(job):
                if len(found) == count:
                    return found, True
                found.append(job)
        return found, False

    def stop(self, job, grace=DEFAULT_STOP_GRACE):
        """Asks `job` to end (SIGTERM, then SIGKILL after `grace` seconds), joining its stop in flight; returns at once:
        job.ended tells when every process of it is gone."""
        self._stopper.stop(job, grace)

    def remove(self, job):
        """Removes an ended job and its output now; a stream of it ends."""
        if job.outcome is None:
            raise Refused("FAILED_PRECONDITION", f"job {job.id} is running: stop it first")
        job.ended.wait()  # a stream may tell a job's end before the teardown has written its final record
        with self._lock:
            if self._jobs.get(job.id) is not job:
                raise Refused("NOT_FOUND", f"no job {job.id}")  # removed by another call, or by retention
            self._forget(job)
        job.log.remove()

    def _forget(self, job):
        del self._jobs[job.id]
        self._ended.pop(job.id, None)

    def _finish(self, job):
        """On the teardown thread, once the job's init has exited: how it ended, its final record, and retention."""
        with self._lock:
            self._not_running(job.owner)  # before its end is told, so that its owner may start another job at once
        job.end()
        self._stopper.forget(job)
        with self._lock:
            if self._jobs.get(job.id) is job:  # not yet added (_add does it then), or removed already
                self._has_ended(job)

    def _retain(self):
        """The retention thread: removes the ended jobs past the retention's bounds, at start, after each job's end,
        and when the oldest comes of age; on a thread of its own, so that no request waits for a removal."""
        name_this_thread("retention")
        while True:
            with self._lock:
                expired, due = self.retention.expired(self._ended, time.time())
                while not expired and not self._closed:
                    self._retention_due.wait(None if due is None else max(0.0, due - time.time()))
                    expired, due = self.retention.expired(self._ended, time.time())
                if self._closed:
                    return
                for job in expired:
                    self._forget(job)
            for job in expired:
                job.log.remove()

    def shutdown(self):
        """Stops every running job, waits for them, and releases everything the manager holds; bounded in time."""
        with self._lock:
            self._closed = True
            self._retention_due.notify()
        self.pool.close()  # a Start waiting for an init fails now; one that has its init ends within its deadline
        with self._lock:
            self._no_start_under_way.wait_for(lambda: not self._starting)
        for job in self.jobs():
            self._stopper.stop(job, SHUTDOWN_GRACE)
        self._stopper.close()  # once every job has ended, or its last escalation has passed
        self._pump.stop()
        self._teardown.shutdown(wait=True)  # every job's final record is written
        self._syncer.shutdown(wait=True)
        self._retainer.join()
        self.pool.launcher.close()  # last: it kills what a job without a PID namespace leaves when its init is killed
        if self.sandbox.cgroups:
            self.sandbox.cgroups.close()


class Stopper:
    """Stops jobs, on a thread of its own: SIGTERM at a job's first Stop, SIGKILL once the shortest grace any of its
    Stops asked for has passed (at once for a force Stop), and KILL_GRACE later SIGKILL to its init too (a job without a
    PID namespace can stop its init). A later Stop joins the one in flight: one timeline per job, however many wait."""

    ESCALATIONS = ("kill", "kill_init", None)  # of its InitHandle; None: the job has not ended, although all was done

    def __init__(self):
        self._due = {}  # Job -> [when its next escalation is due (time.monotonic()), which]
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="stops", daemon=True)
        self._thread.start()

    def stop(self, job, grace):
        with self._changed:
            if job.ended.is_set():
                return
            when = time.monotonic() + grace
            due = self._due.get(job)
            first = due is None
            if first:
                job.stop_requested = True
                self._due[job] = [when, 0]
            elif due[1] == 0 and when < due[0]:  # a shorter grace brings the SIGKILL closer; a longer one, nothing
                due[0] = when
            self._changed.notify()
        if first and grace:
            job.init.signal(signal.SIGTERM)

    def forget(self, job):
        """Called once the job has ended."""
        with self._changed:
            self._due.pop(job, None)
            self._changed.notify()

    def close(self):
        """Returns once every job asked to stop has ended or run out of escalations (at most 2 × KILL_GRACE after its
        grace), and the thread has gone."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _run(self):
        name_this_thread("stops")
        while True:
            with self._changed:
                while not (due := self._next_due()):
                    if self._closed and not self._due:
                        return
                    soonest = min((when for when, _ in self._due.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - time.monotonic())
            for job, escalation in due:
                if job.ended.is_set():
                    continue
                if escalation:
                    getattr(job.init, escalation)()
                else:
                    logging.error("job %s has not ended, although its init was killed", job.id)

    def _next_due(self):
        """The escalations due now, each job's next one scheduled (under the lock): [(job, escalation)]."""
        now, due = time.monotonic(), []
        for job, (when, which) in list(self._due.items()):
            if when <= now:
                due.append((job, self.ESCALATIONS[which]))
                if which + 1 < len(self.ESCALATIONS):
                    self._due[job] = [now + KILL_GRACE, which + 1]
                else:
                    del self._due[job]
        return due


MAX_VARIABLES_BYTES = 64 * 1024  # the client's variables, as KEY=VALUE\0; the kernel takes 128 KiB in one string


def check_variables(env):
    """Refuses (INVALID_ARGUMENT) variables no environment can hold, and more than MAX_VARIABLES_BYTES of them."""
    size = 0
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise Refused("INVALID_ARGUMENT", f"not a variable name: {key[:64]!r} (it is empty, or holds '=' or NUL)")
        if "\0" in value:
            raise Refused("INVALID_ARGUMENT", f"the value of {key[:64]} holds a NUL byte, which no variable can hold")
        size += len(key.encode()) + len(value.encode()) + 2
    if size > MAX_VARIABLES_BYTES:
        raise Refused("INVALID_ARGUMENT", f"the variables take {size} bytes as KEY=VALUE, more than the "
                                          f"{MAX_VARIABLES_BYTES} a job may be given")


class Retention:
    """How many ended jobs are kept, and for how long: past either bound the oldest go; running jobs are never
    removed."""

    def __init__(self, keep_jobs=DEFAULT_KEEP_JOBS, keep_for=DEFAULT_KEEP_FOR):
        self.keep_jobs, self.keep_for = keep_jobs, keep_for

    def expired(self, ended, now):
        """Of `ended` (id -> Job, the oldest first), the jobs to remove now; and when the next will be due (or None)."""
        expired, excess = [], len(ended) - self.keep_jobs
        for job in ended.values():
            if len(expired) >= excess and job.outcome.ended_at + self.keep_for > now:
                return expired, job.outcome.ended_at + self.keep_for
            expired.append(job)
        return expired, None


class DiskSpace:
    """The data directory's free space: a Start is refused while it is under the reserve (--min-free), and a full
    disk is logged once, however many jobs' output it refuses, until a Start finds room again."""

    def __init__(self, path, min_free):
        self.path = path
        stat = os.statvfs(path)
        self.reserve = (int(stat.f_blocks * stat.f_frsize * float(min_free[:-1]) / 100) if min_free.endswith("%")
                        else parse_size(min_free))
        self._full = False
        self._lock = threading.Lock()

    def check(self):
        stat = os.statvfs(self.path)
        free = stat.f_bavail * stat.f_frsize
        if free < self.reserve:
            raise Refused("RESOURCE_EXHAUSTED", f"the data directory has {free} bytes free, under this server's "
                                                f"reserve of {self.reserve} (--min-free): remove ended jobs")
        with self._lock:
            if self._full:
                self._full = False
                logging.info("the data directory has room again (%d bytes free)", free)

    def full(self, job_id):
        """From the output pump: the disk refused a job's output."""
        with self._lock:
            if self._full:
                return
            self._full = True
        logging.error("the data directory's file system is full (job %s's output was refused): job output is dropped, "
                      "and counted in each job's status, and Starts are refused under the reserve", job_id)


class Outcome:
    """How a job ended: its state, the command's exit code or the signal that ended it, what it used, and when."""

    __slots__ = ("state", "exit_code", "signal", "usage", "ended_at")

    def __init__(self, state, exit_code, sig, usage, ended_at=None):
        self.state, self.exit_code, self.signal, self.usage = state, exit_code, sig, usage
        self.ended_at = time.time() if ended_at is None else ended_at


RECORD, RECORD_VERSION = "record.json", 2  # a job's record in its directory, and the record's format
# Format 1 named the owner by its CN alone, which cannot say which of the subjects with that CN it was: such a job is
# loaded as nobody's (an empty owner), which only the roles that see every job see.
CN_OWNED_RECORD_VERSION = 1


class Job:
    """One command run for a client: who owns it, what confines it, its output, how it ended, and its init while it
    runs. Its record on disk holds the same, so that it outlives the server."""

    __slots__ = ("id", "log", "init", "owner", "command", "env", "working_directory", "pid", "isolation",
                 "started_at", "outcome", "stop_requested", "ended", "number", "_waiters", "_waiters_lock")

    def __init__(self, job_id, log, owner, command, env, working_directory, pid, isolation, started_at, init=None):
        self.id, self.log, self.init = job_id, log, init
        self.owner, self.command, self.env, self.working_directory = owner, command, env, working_directory
        self.pid, self.isolation = pid, isolation
        self.started_at = started_at
        self.outcome = None  # set once, when the job has ended, and never changed
        self.stop_requested = False
        self.ended = threading.Event()
        self._waiters = set()  # the Events of Wait calls, set when the job ends
        self._waiters_lock = threading.Lock()
        self.number = 0  # its place in the manager's order of Starts (List's pages)

    @classmethod
    def started(cls, init, owner, command, env, working_directory):
        """A job whose command its init has just started: `env` holds the client's variables alone."""
        return cls(init.id, init.log, owner, list(command), dict(env), working_directory, init.command_pid,
                   init.isolation(), time.time(), init)

    @classmethod
    def restored(cls, record, log):
        """A job of an earlier server, from its record. One that ran when that server ended is LOST, then: its
        processes ended with it (each init ends its job when the server goes), after its last output."""
        if record.get("version") not in (CN_OWNED_RECORD_VERSION, RECORD_VERSION):
            raise ValueError(f"record format {record.get('version')!r} (this server reads {CN_OWNED_RECORD_VERSION} "
                             f"and {RECORD_VERSION})")
        owner = record["owner"] if record["version"] == RECORD_VERSION else ""
        job = cls(record["job_id"], log, owner, record["command"], record["env"],
                  record["working_directory"], record["pid"], record["isolation"], record["started_at"])
        if record["state"] == "RUNNING":
            job.outcome = Outcome("LOST", None, 0, {}, max(log.modified_at, job.started_at))
        else:
            job.outcome = Outcome(record["state"], record["exit_code"], record["signal"], record["usage"],
                                  record["ended_at"])
        log.dropped = record["output_dropped_bytes"]
        job.status()  # a record that cannot make a status is unreadable: found now, not by a Query
        job.ended.set()  # before anyone can wait for it: a Wait returns at once
        return job

    @property
    def state(self):
        return self.outcome.state if self.outcome else "RUNNING"

    def end(self):
        """Called once the init has exited and the job's output is in its log: records how the job ended."""
        try:
            report, usage = self.init.release()
        except Exception:
            logging.exception("job %s: cannot read how it ended", self.id)
            report, usage = {}, {}
        exit_code = report.get("exit_code")
        sig = 0 if exit_code is not None else report.get("signal", signal.SIGKILL)  # no report: the init was killed
        # The init says whether a Stop's signal ended the command; one that exited by itself as the Stop came, or
        # before, is EXITED.
        if report.get("stopped", self.stop_requested):
            state = "STOPPED"
        elif usage.get("oom_killed") and sig == signal.SIGKILL:
            state = "OOM_KILLED"
        else:
            state = "EXITED"
        self.outcome = Outcome(state, exit_code, sig, usage)
        try:
            self.log.close()  # after the outcome is set, so that a stream's last message carries it
            self.save()
        except OSError as e:  # the job has ended all the same; a later server would find it LOST
            logging.error("job %s: cannot write its final record: %s", self.id, e)
        finally:
            with self._waiters_lock:
                self.ended.set()
                for woken in self._waiters:
                    woken.set()

    def wait(self, woken):
        """Returns once the job has ended, or `woken` (a threading.Event) has been set by someone else."""
        with self._waiters_lock:
            if self.ended.is_set():
                return
            self._waiters.add(woken)
        try:
            woken.wait()
        finally:
            with self._waiters_lock:
                self._waiters.discard(woken)

    def save(self, synced=True):
        """Writes the job's record, as its status says it (see write_record)."""
        outcome = self.outcome
        write_record(self.log, synced=synced, record={
            "version": RECORD_VERSION, "job_id": self.id, "owner": self.owner, "command": self.command,
            "env": self.env, "working_directory": self.working_directory, "pid": self.pid,
            "isolation": self.isolation, "started_at": self.started_at, "state": self.state,
            "exit_code": outcome.exit_code if outcome else None, "signal": outcome.signal if outcome else 0,
            "ended_at": outcome.ended_at if outcome else None, "usage": outcome.usage if outcome else {},
            "output_bytes": self.log.size, "output_dropped_bytes": self.log.dropped})

    def status(self):
        outcome = self.outcome
        usage = outcome.usage if outcome else self.init.usage()
        isolation = dict(self.isolation, limits=pb.Limits(**self.isolation["limits"]))
        status = pb.JobStatus(job_id=self.id, owner=self.owner, command=self.command, pid=self.pid,
                              state=pb.JobState.Value(self.state), output_bytes=self.log.size,
                              output_dropped_bytes=self.log.dropped, usage=pb.Usage(**usage),
                              isolation=pb.Isolation(**isolation), env=self.env,
                              working_directory=self.working_directory)
        status.started_at.FromNanoseconds(int(self.started_at * 1e9))
        if outcome:
            status.ended_at.FromNanoseconds(int(outcome.ended_at * 1e9))
            status.signal = outcome.signal
            if outcome.exit_code is not None:
                status.exit_code = outcome.exit_code
        return status


def write_record(log, record, synced=True):
    """Replaces a job's record, in the directory of its output `log`, with a new file renamed over it, so that a
    server killed at any moment leaves one record or the other, whole. `synced`: the new file reaches the disk before
    the rename and the directory after it, so that a power loss does too; otherwise sync_record() follows (a Start's
    record: two flushes would double the Start's time)."""
    temporary = RECORD + ".new"
    with log.directory() as directory:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)  # what a killed server left: made anew, never written through
        try:
            fd = open_file(directory, temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                _write_all(fd, json.dumps(record).encode())
                if synced:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, RECORD, src_dir_fd=directory, dst_dir_fd=directory)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise
        if synced:
            os.fsync(directory)


def sync_record(log):
    """Flushes a record written unsynced, and its directory, to the disk (unless its job has been removed since)."""
    try:
        with log.directory() as directory:
            fd = open_file(directory, RECORD, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(directory)
    except FileNotFoundError:
        pass
    except OSError as e:
        logging.error("cannot sync the record of job %s: %s", log.name, e)


def read_record(jobs_dir, job_id):
    """A job's record, from its directory in `jobs_dir` (a descriptor)."""
    with opened_directory(jobs_dir, job_id) as directory, open(open_file(directory, RECORD, os.O_RDONLY), "rb") as f:
        return json.loads(f.read())


def load_jobs(jobs_dir):
    """The jobs earlier servers left in `jobs_dir` (a descriptor), from their records (those LOST written again as
    such). A directory without a record was an unused init's (or a failed Start's), and is removed; a record that
    cannot be read, or a symbolic link where a directory or a file should be, is logged, and left alone."""
    jobs, rewritten = [], 0
    for entry in os.scandir(jobs_dir):
        try:
            record = read_record(jobs_dir, entry.name)
        except FileNotFoundError:
            shutil.rmtree(entry.name, dir_fd=jobs_dir, ignore_errors=True)
            continue
        except (OSError, ValueError) as e:
            logging.error("job %s: cannot read its record, skipped: %s", entry.name, e)
            continue
        try:
            if not isinstance(record, dict) or record.get("job_id") != entry.name:
                raise ValueError("it is not the record of the job its directory is named for")
            job = Job.restored(record, OutputLog(jobs_dir, entry.name, existing=True))
            if record["state"] == "RUNNING":
                job.save(synced=False)  # all flushed at once, below
                rewritten += 1
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logging.error("job %s: cannot read its record, skipped: %s", entry.name, e)
            continue
        jobs.append(job)
    lost = sum(job.state == "LOST" for job in jobs)
    if rewritten:
        libc("syncfs", jobs_dir)  # one flush for every LOST record written
    if jobs:
        logging.info("%d jobs of earlier servers loaded (%d lost)", len(jobs), lost)
    return jobs


class LimitPolicy:
    """The server's defaults (applied where the client sets no limit) and maxima (refused above)."""

    CONTROLLER = {"cpu_cores": "cpu", "memory_bytes": "memory", "io_read_bps": "io", "io_write_bps": "io",
                  "pids": "pids"}
    MINIMA = {"memory_bytes": (4 << 20, "4 MiB", "the job's init needs some"),
              "io_read_bps": (2, "2 bytes a second", "cgroup v2's io.max takes no less"),
              "io_write_bps": (2, "2 bytes a second", "cgroup v2's io.max takes no less")}
    DEFAULT_PIDS = 1024   # processes and threads of a job that asks for no limit: a fork bomb stops there

    def __init__(self, defaults=None, maxima=None, available=()):
        self.maxima = {"cpu_cores": float(os.cpu_count() or 1), "memory_bytes": memory_total(),
                       "io_read_bps": 0, "io_write_bps": 0, "pids": 32768}
        self.maxima.update(maxima or {})
        if below := self._below_minimum(self.maxima):
            raise ValueError(f"a maximum {below}")
        # Out of the box, no job can take the host's processes or more than a quarter of its memory; nor more than a
        # --max says. CPU and disk time are shared by the kernel's schedulers among whoever wants them.
        self.defaults = dict.fromkeys(LIMITS, 0)
        for name, value in (("pids", self.DEFAULT_PIDS), ("memory_bytes", memory_total() // 4)):
            self.defaults[name] = min(value, self.maxima[name] or value)
        self.defaults.update(defaults or {})
        self.unavailable = {}  # controller -> why this server cannot enforce its limits, for the refusal
        self.available = set(available)
        for name, value in self.defaults.items():
            if self.maxima[name] and value > self.maxima[name]:
                raise ValueError(f"the default {name} {value:g} exceeds the maximum of {self.maxima[name]:g}")
        if below := self._below_minimum(self.defaults):
            raise ValueError(f"a default {below}")

    def resolve(self, requested):
        """The limits a job gets, or Refused (INVALID_ARGUMENT, FAILED_PRECONDITION)."""
        limits = {}
        for name in LIMITS:
            value = requested.get(name, 0)
            if name == "cpu_cores" and (not math.isfinite(value) or value < 0):
                raise Refused("INVALID_ARGUMENT", f"cpu_cores must be a finite number >= 0, not {value}")
            available = self.CONTROLLER[name] in self.available
            if value and not available:
                why = self.unavailable.get(self.CONTROLLER[name])
                raise Refused("FAILED_PRECONDITION", f"{name} limits are not available on this server" +
                              (f": {why}" if why else ""))
            if self.maxima[name] and value > self.maxima[name]:
                raise Refused("INVALID_ARGUMENT", f"{name} {value:g} exceeds this server's maximum of "
                                                  f"{self.maxima[name]:g}")
            limits[name] = value or (self.defaults[name] if available else 0)
        if below := self._below_minimum(limits):
            raise Refused("INVALID_ARGUMENT", below)
        return limits

    def _below_minimum(self, limits):
        """The first of `limits` set below the least it may be, said in words; or None."""
        for name, (least, shown, why) in self.MINIMA.items():
            if 0 < limits[name] < least:
                return f"{name} must be at least {shown} ({why})"
        return None


def memory_total():
    return os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE


# ---------------------------------------------------------------------------------------------------------------------
# Isolation: what confines every job (its user, cgroup and namespaces), found out once, when the server starts
# The inits put each job into them (the next sections); this section makes, limits, reads and removes cgroups.
# ---------------------------------------------------------------------------------------------------------------------

JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # where a job's commands are looked for
NAMESPACES = {"pid": CLONE_NEWPID, "mount": CLONE_NEWNS, "network": CLONE_NEWNET, "ipc": CLONE_NEWIPC,
              "cgroup": CLONE_NEWCGROUP}
# Above the range systemd gives containers (524288-1879048191) and far from host accounts and DynamicUser's range.
TRANSIENT_IDS = (0x70000000, 0x7000FFFF)
DYNAMIC_USER_IDS = range(61184, 65520)  # systemd's DynamicUser=
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")  # each a fresh tmpfs of the job's own
TMP_SIZE = "25%"  # of the host's memory, each, for a job with no memory limit (a limited job's are its limit)
CONTROLLERS = ("cpu", "memory", "io", "pids")  # what the limits need
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")  # whose writes are memory: there is no disk to limit, the memory limit does
SCOPE_ASKED = "JOBWORKER_SCOPE_ASKED"  # set once the server has asked systemd for a scope, so that it asks once


class Unusable(Exception):
    """Cgroups this server may not use as they are: what is wrong, and the command that fixes it."""

    def __init__(self, problem, fix):
        super().__init__(problem)
        self.fix = fix


class Sandbox:
    """What confines every job on this server: the isolation mode, its cgroups, namespaces, user and environment.

    What the host cannot give is said at start, in one line with the command that fixes it: `on` refuses to start
    with it, `auto` runs jobs with what there is (each status says which limits apply), and a Start asking for a limit
    this server cannot enforce is refused with the reason (`unavailable`).
    """

    def __init__(self, mode="auto", run_as=None, cgroup="auto", io_device=None, data_dir=".", uid_range=TRANSIENT_IDS):
        root = os.geteuid() == 0
        self.mode, self.cgroups, self.namespaces = mode, None, []
        self._choose_user(run_as, uid_range if root and mode != "off" and not run_as else None)
        self.unavailable = {}  # controller -> why its limits cannot be had on this server
        problems, fixes = [], []
        if mode == "off":
            self.unavailable = dict.fromkeys(CONTROLLERS, "isolation is off")
        elif not root:
            problems.append("isolation needs root")
            fixes.append("start the server as root")
            self.unavailable = dict.fromkeys(CONTROLLERS, "isolation needs root")
        else:
            self._find_cgroups(cgroup, io_device, data_dir, problems, fixes)
            for name, flag in NAMESPACES.items():
                if _can_unshare(flag):
                    self.namespaces.append(name)
                else:
                    problems.append(f"{name} namespaces are unavailable")
            if os.uname().machine not in AUDIT_ARCHES:
                problems.append(f"jobs cannot be kept from user namespaces on {os.uname().machine}")
            if "mount" in self.namespaces and not _can_protect_mounts():
                problems.append("the kernel cannot make a job's mounts read-only and nosuid (mount_setattr, Linux "
                                "5.12)")
        line = "; ".join(problems) + (f" (to fix: {'; '.join(fixes)})" if fixes else "")
        if problems and mode == "on":
            if self.cgroups:
                self.cgroups.close()
            raise SystemExit("jobworker: --isolation on, but " + line)
        if problems:
            logging.warning("isolation: %s", line)
        self.namespace_flags = sum(NAMESPACES[name] for name in self.namespaces)
        self.mounts = self._mounts(problems) if "mount" in self.namespaces else None
        self.no_user_namespaces = bool(self.namespaces) and os.uname().machine in AUDIT_ARCHES
        logging.info("isolation %s: cgroup %s (limits: %s), namespaces %s, jobs run as %s", mode,
                     self.cgroups.version if self.cgroups else "none", ", ".join(sorted(self.controllers)) or "none",
                     ", ".join(self.namespaces) or "none",
                     f"transient users {self.ids.first}-{self.ids.last}" if self.ids else self.user)

    def _choose_user(self, run_as, uid_range):
        """Who jobs run as: each its own transient uid from `uid_range` (with the gid of the same number), or one
        user for all, `run_as` (nobody for a server that is root with isolation off, else the server's own)."""
        self.ids = TransientIds(*uid_range) if uid_range else None
        if self.ids:
            self.user = self.uid = self.gid = None
            # A transient uid has no name, and no home but the private /tmp, where the job starts unless told.
            self.environment = {"PATH": JOB_PATH, "HOME": "/tmp", "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
            self.working_directory = "/tmp"
            return
        root = os.geteuid() == 0
        try:
            user = pwd.getpwnam(run_as) if run_as else pwd.getpwnam("nobody") if root else pwd.getpwuid(os.geteuid())
        except KeyError:
            raise SystemExit(f"jobworker: no user {run_as or 'nobody'} on this host (--run-as)") from None
        if not root and user.pw_uid != os.geteuid():
            raise SystemExit(f"jobworker: --run-as {run_as} needs the server to run as root")
        self.user, self.uid, self.gid = user.pw_name, user.pw_uid, user.pw_gid
        self.environment = {"PATH": JOB_PATH, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name,
                            "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
        self.working_directory = "/"

    def _mounts(self, problems):
        """What an init does in its job's mount namespace (see Init._private_mounts)."""
        again, remounted = [], {"cgroup": "cgroup", "cgroup2": "cgroup", "mqueue": "ipc"}
        controllers = {line.split()[0] for line in _read("/proc/cgroups").splitlines()[1:]}
        for line in _read("/proc/self/mountinfo").splitlines():
            fields = line.split()
            point, (fstype, _, options) = fields[4], fields[fields.index("-") + 1:][:3]
            if remounted.get(fstype) in self.namespaces:  # a cgroup v1 tree is mounted by its controllers, or name
                kept = [o for o in options.split(",") if o in controllers or o.startswith("name=")]
                again.append([point.replace("\\040", " "), fstype, ",".join(kept) * (fstype == "cgroup")])
        protected = not any("mount_setattr" in problem for problem in problems)
        return {"read_only": bool(self.ids) and protected, "nosuid": protected, "again": again,
                "tmp": [path for path in PRIVATE_TMP if os.path.isdir(path)]}

    def _find_cgroups(self, choice, io_device, data_dir, problems, fixes):
        """Finds the cgroups jobs go in, and what of them is missing."""
        try:
            self.cgroups = Cgroups.detect(choice, io_device or block_device_of(data_dir))
            if self.cgroups is None:
                raise Unusable("no usable cgroup hierarchy", "--cgroup for the one the host has, or mount cgroup2")
        except (Unusable, OSError) as e:
            problem = str(e) if isinstance(e, Unusable) else f"cgroups: {e}"
            problems.append(problem)
            fixes += [e.fix] if isinstance(e, Unusable) else []
            self.unavailable = dict.fromkeys(CONTROLLERS, problem)
            return
        missing = [controller for controller in CONTROLLERS if controller not in self.cgroups.controllers]
        if missing:
            problems.append(f"cgroup {self.cgroups.version} lacks the {', '.join(missing)} controller(s)")
            fixes.append(self.cgroups.MISSING_FIX)
            self.unavailable.update({controller: f"its cgroup {self.cgroups.version} hierarchy has no {controller} "
                                                 "controller for it" for controller in missing})
        if "io" not in missing and not self.cgroups.io_device:
            filesystem = filesystem_of(data_dir)
            if filesystem in MEMORY_FILESYSTEMS:  # not a problem: what jobs write there, memory limits cover
                self.unavailable["io"] = (f"the data directory is on {filesystem}, whose writes are memory (memory "
                                          "limits cover them): there is no disk to limit")
            else:
                problems.append(f"no block device under the data directory ({filesystem}): disk limits are "
                                "unavailable")
                fixes.append("--io-device MAJ:MIN, or a data directory on a disk")
                self.unavailable["io"] = f"there is no block device under the data directory ({filesystem})"

    @property
    def controllers(self):
        """The limits this server can enforce, by controller."""
        return {controller for controller in CONTROLLERS if controller not in self.unavailable}


class TransientIds:
    """The uids jobs run as, each with the gid of the same number: one per running job, from a range no account of
    the host uses. A job's is taken at its Start and given back once none of its processes is left; taken round the
    range, so that an id given back is the last to be taken again."""

    def __init__(self, first, last):
        if not 0 < first <= last < 0xFFFFFFFF:
            raise SystemExit(f"jobworker: --uid-range {first}-{last} is not a range of uids")
        ids = range(first, last + 1)
        users = [entry.pw_name for entry in pwd.getpwall() if entry.pw_uid in ids]
        groups = [entry.gr_name for entry in grp.getgrall() if entry.gr_gid in ids]
        if users or groups or 65534 in ids or 65535 in ids or (first < DYNAMIC_USER_IDS.stop and
                                                              last >= DYNAMIC_USER_IDS.start):
            taken = ", ".join(users + groups) or "nobody, or systemd's DynamicUser range 61184-65519"
            raise SystemExit(f"jobworker: --uid-range {first}-{last} holds ids the host uses ({taken}): jobs must "
                             "have ids of their own")
        self.first, self.last = first, last
        self._next = first
        self._taken = set()
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            for _ in range(self.last - self.first + 1):
                uid, self._next = self._next, self._next + 1 if self._next < self.last else self.first
                if uid not in self._taken:
                    self._taken.add(uid)
                    return uid
        raise Refused("RESOURCE_EXHAUSTED", "every uid of this server's --uid-range is a running job's")

    def give_back(self, uid):
        with self._lock:
            self._taken.discard(uid)


def _can_protect_mounts():
    """Whether this kernel can make every mount of a job's namespace read-only and nosuid at once (mount_setattr):
    tried in a throwaway child, in a mount namespace of its own."""
    pid = os.fork()
    if pid == 0:
        try:
            libc("unshare", CLONE_NEWNS)
            libc("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
            protect_mounts(MOUNT_ATTR_NOSUID)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def _can_unshare(flag):
    """Whether this host can give a job a namespace of this kind: tried in a throwaway child."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _libc.unshare(flag) == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0


def block_device_of(path):
    """'MAJ:MIN' of the whole disk under path (the kernel throttles disks, not partitions), or None."""
    device = os.stat(path).st_dev
    sysfs = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
    if not os.path.exists(sysfs):
        return None  # not a block device: tmpfs, overlay, ...
    if os.path.exists(os.path.join(sysfs, "partition")):
        return _read(os.path.join(sysfs, "..", "dev")).strip()
    return _read(os.path.join(sysfs, "dev")).strip()


def filesystem_of(path):
    """The type of the file system path is on ("ext4", "tmpfs", ...), from the mount of its device."""
    device = os.stat(path).st_dev
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if fields[2] == f"{os.major(device)}:{os.minor(device)}":
            return fields[fields.index("-") + 1]
    return "an unknown file system"


def on_systemd():
    """Whether systemd is this host's init (the test sd_booted() makes)."""
    return os.path.isdir("/run/systemd/system")


def systemd_delegated(directory):
    """Whether systemd has delegated this cgroup (Delegate=yes) to the process in it. systemd marks the cgroups it
    delegates with an extended attribute; one too old for that is asked for the unit's Delegate property."""
    with contextlib.suppress(OSError):  # no such attribute: not delegated, or by a systemd that does not mark it
        return os.getxattr(directory, "trusted.delegate") == b"1"
    unit = os.path.basename(directory)
    if not unit.endswith((".service", ".scope")):
        return False
    shown = subprocess.run(["systemctl", "show", "--property=Delegate", "--value", unit], capture_output=True,
                           text=True, timeout=60)
    return shown.stdout.strip() == "yes"


def into_a_delegated_scope(isolation, cgroup):
    """Started by hand on a systemd host, the server is in a cgroup of systemd's that is not its own to divide: a login
    session's scope, which holds the shell too. It asks systemd for one of its own, through systemd's interface for
    that: it runs itself again, in place (the same pid, descriptors and environment), in a transient scope with
    Delegate=yes, as `systemd-run --scope -p Delegate=yes` makes. Once: a variable says it has asked. A service is left
    where it is (moving its main process out of it would end it in systemd's eyes): its unit must delegate."""
    if os.geteuid() != 0 or isolation == "off" or os.environ.get(SCOPE_ASKED) or not on_systemd() or \
            not shutil.which("systemd-run"):
        return
    version, mount_point = Cgroups.hierarchy(cgroup)
    if version != "v2":
        return
    own = CgroupV2.own(mount_point)
    if own == mount_point or own.endswith(".service") or systemd_delegated(own):
        return
    os.environ[SCOPE_ASKED] = "1"
    argv = ["systemd-run", "--scope", "-p", "Delegate=yes", "--quiet", "--collect", f"--unit=jobworker-{os.getpid()}",
            "--", sys.executable, *sys.argv]
    logging.info("isolation: the cgroup %s is systemd's, not delegated to this server: running again in a scope of "
                 "its own, jobworker-%d.scope (%s)", own[len(mount_point):], os.getpid(), " ".join(argv[:7]))
    os.execvp(argv[0], argv)


class Cgroups:
    """The host's cgroup hierarchy, in which every job gets a group of its own.

    Subclasses speak v2 (one unified tree) or v1 (one tree per controller). Jobs go under the server's own cgroup, so
    that whatever confines the server confines its jobs too, in a directory of this server's own, named for its pid
    and its PID namespace, so that servers sharing a cgroup never touch each other's jobs. A job's group is a list of
    directories, one per tree.
    """

    version = None
    PERIOD_US = 100_000
    PREFIX = "jobworker-"

    def __init__(self, io_device, parents):
        self.io_device = io_device
        self.parents = parents
        self.remove_stale()
        self.bases = [os.path.join(parent, self.base_name(os.getpid())) for parent in parents]
        for base in self.bases:
            os.makedirs(base, exist_ok=True)

    @staticmethod
    def base_name(pid):
        return f"{Cgroups.PREFIX}{pid}-{os.stat('/proc/self/ns/pid').st_ino}"

    @staticmethod
    def hierarchy(choice="auto"):
        """Which cgroups this host's jobs go in (`choice` of auto, v1, v2): ("v2", its mount point), ("v1", {controller:
        its mount point}), or (None, None) when there are none we can use."""
        mounts = []
        for line in _read("/proc/self/mountinfo").splitlines():
            fields = line.split()
            tail = fields[fields.index("-") + 1:]
            mounts.append((fields[4].replace("\\040", " "), tail[0], set(tail[2].split(","))))
        v2 = next((point for point, fstype, _ in mounts if fstype == "cgroup2"), None)
        v1 = {option: point for point, fstype, options in mounts if fstype == "cgroup" for option in options}
        if v2 and (choice == "v2" or (choice == "auto" and (not v1 or CgroupV2.has_controllers(v2)))):
            return "v2", v2
        if v1 and choice in ("v1", "auto"):
            return "v1", v1
        return None, None

    @staticmethod
    def detect(choice="auto", io_device=None):
        """Cgroups for this host (`choice` of auto, v1, v2), or None when there is none we can use; Unusable when the
        server may not use them as they are."""
        version, mounts = Cgroups.hierarchy(choice)
        return CgroupV2(mounts, io_device) if version == "v2" else CgroupV1(mounts, io_device) if version else None

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
            raise Refused("INTERNAL", f"cannot apply the job's limits: {e}") from None

    def procs_files(self, directories):
        return [os.path.join(directory, "cgroup.procs") for directory in directories]

    def remove(self, directories):
        """Removes a group whose processes have exited; the kernel may take a moment to let it go (EBUSY)."""
        deadline = time.monotonic() + KILL_GRACE
        for directory in directories:
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)

    def close(self):
        """Removes this server's directories, once every job has ended."""
        try:
            self.remove(self.bases)
        except OSError as e:
            logging.error("cannot remove %s: %s", self.bases, e)

    def remove_stale(self):
        """Removes what a server that was killed outright left (its jobs' inits have ended the jobs with it).

        Only a server of this PID namespace can be known to be gone: one elsewhere may share our parent cgroup."""
        for parent in self.parents:
            for name in os.listdir(parent):
                pid = name[len(self.PREFIX):].partition("-")[0]
                if not pid.isdigit() or name != self.base_name(pid):
                    continue
                if int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}"):
                    continue
                base = os.path.join(parent, name)
                try:
                    groups = [entry.path for entry in os.scandir(base) if entry.is_dir(follow_symlinks=False)]
                    for group in groups:
                        self.kill([group])
                    self.remove(groups + [base])
                except OSError as e:
                    logging.warning("cannot remove the stale cgroup %s: %s", base, e)

    def _kill_listed(self, directories):
        for procs in self.procs_files(directories):
            for pid in _read(procs).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


class CgroupV2(Cgroups):
    """cgroup v2: the server's own cgroup is the one it divides among its jobs, so it must be the server's to divide.

    It is when it is the root of the tree (no manager above, or a container's cgroup namespace), when systemd has
    delegated it (Delegate=yes: the service unit, or the scope a server started by hand asks for), or, on a host
    without systemd, when no other process is in it. Otherwise the server writes nothing there, and says what to do.
    """

    version = "v2"
    MISSING_FIX = ("enable them in the parent cgroup's cgroup.subtree_control (systemd does, for a unit with "
                   "Delegate=yes: make install-service), or use --cgroup v1 where the kernel has them there")

    @staticmethod
    def has_controllers(mount_point):
        return bool(set(_read(os.path.join(mount_point, "cgroup.controllers")).split()) & set(CONTROLLERS))

    @staticmethod
    def own(mount_point):
        """The directory of this process's cgroup."""
        path = next(line[3:] for line in _read("/proc/self/cgroup").splitlines() if line.startswith("0::"))
        return os.path.normpath(os.path.join(mount_point, path.lstrip("/")))

    @staticmethod
    def check_ours(mount_point, own):
        """Raises Unusable unless the cgroup `own` is this server's to divide."""
        name = own[len(mount_point):] or "/"
        if own == mount_point:
            return
        if on_systemd():
            if systemd_delegated(own):
                return
            fix = ("add Delegate=yes to its unit's [Service] (systemctl edit), as jobworker.service has"
                   if own.endswith(".service") else "run it as the jobworker service (make install-service), or "
                   "in a scope of its own: systemd-run --scope -p Delegate=yes -- python3 jobworker.py serve ...")
            raise Unusable(f"its cgroup {name} is systemd's, not delegated to it", fix)
        others = set(_read(os.path.join(own, "cgroup.procs")).split()) - {str(os.getpid())}
        if others:
            group = os.path.join(mount_point, "jobworker")
            raise Unusable(f"its cgroup {name} holds {len(others)} other process(es), so it cannot give jobs "
                           "controllers of their own", f"start it alone in a cgroup: mkdir {group}; sh -c 'echo $$ > "
                           f"{group}/cgroup.procs && exec python3 jobworker.py serve ...'")

    def __init__(self, mount_point, io_device):
        mount_point = os.path.normpath(mount_point)
        own = self.own(mount_point)
        self.check_ours(mount_point, own)
        if own != mount_point:
            # A non-root group with processes in it cannot hand controllers to children ("no internal processes"),
            # so the server moves itself into a leaf of its own group, as systemd's delegation rules ask.
            leaf = os.path.join(own, "supervisor")
            os.makedirs(leaf, exist_ok=True)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        super().__init__(io_device, [own])
        self.controllers = set(_read(os.path.join(own, "cgroup.controllers")).split()) & set(CONTROLLERS)
        for directory in (own, self.bases[0]):
            for controller in sorted(self.controllers):
                try:
                    _write(os.path.join(directory, "cgroup.subtree_control"), "+" + controller)
                except OSError:
                    self.controllers.discard(controller)

    def create(self, name):
        directories = super().create(name)
        oom_group = os.path.join(directories[0], "memory.oom.group")
        try:
            if "memory" in self.controllers and os.path.exists(oom_group):
                # An OOM kill takes the whole job, its init too, as it takes a container: what a job has left once
                # the kernel killed one of its processes is rarely of use, and the job's status says OOM_KILLED.
                _write(oom_group, "1")
        except OSError:
            self.remove(directories)
            raise
        return directories

    def _apply(self, directories, limits):
        (directory,), applied = directories, {}

        def put(name, value, limit):
            _write(os.path.join(directory, name), value)
            applied[limit] = limits[limit]

        if limits["cpu_cores"] and "cpu" in self.controllers:
            put("cpu.max", f"{max(1000, int(limits['cpu_cores'] * self.PERIOD_US))} {self.PERIOD_US}", "cpu_cores")
        if limits["memory_bytes"] and "memory" in self.controllers:
            put("memory.max", str(limits["memory_bytes"]), "memory_bytes")
            if os.path.exists(os.path.join(directory, "memory.swap.max")):
                _write(os.path.join(directory, "memory.swap.max"), "0")
        if limits["pids"] and "pids" in self.controllers:
            put("pids.max", str(limits["pids"] + 1), "pids")  # + the init
        if self.io_device and "io" in self.controllers:
            for limit, key in (("io_read_bps", "rbps"), ("io_write_bps", "wbps")):
                if limits[limit]:
                    put("io.max", f"{self.io_device} {key}={limits[limit]}", limit)
        return applied

    def kill(self, directories):
        (directory,) = directories
        kill_file = os.path.join(directory, "cgroup.kill")
        if os.path.exists(kill_file):
            _write(kill_file, "1")
        else:  # before Linux 5.14
            self._kill_listed(directories)

    def usage(self, directories):
        (directory,) = directories
        peak = os.path.join(directory, "memory.peak")
        return {"cpu_seconds": _keyed(os.path.join(directory, "cpu.stat")).get("usage_usec", 0) / 1e6,
                "peak_memory_bytes": int(_read(peak)) if os.path.exists(peak) else 0,
                "oom_killed": _keyed(os.path.join(directory, "memory.events")).get("oom_kill", 0) > 0}


class CgroupV1(Cgroups):
    version = "v1"
    TREES = {"cpu": "cpu", "cpuacct": None, "memory": "memory", "blkio": "io", "pids": "pids"}
    MISSING_FIX = "mount their cgroup v1 hierarchies, or boot with cgroup v2"

    def __init__(self, mounts, io_device):
        own = {}
        for _, controllers, path in (line.split(":", 2) for line in _read("/proc/self/cgroup").splitlines()):
            for controller in controllers.split(","):
                own[controller] = path
        parents = {controller: os.path.join(mounts[controller], own[controller].lstrip("/"))
                   for controller in self.TREES if controller in mounts and controller in own}
        super().__init__(io_device, sorted(set(parents.values())))  # a tree may hold several ("cpu,cpuacct")
        self.dirs = {controller: os.path.join(parent, self.base_name(os.getpid()))
                     for controller, parent in parents.items()}  # controller -> this server's directory in its tree
        self.controllers = {self.TREES[c] for c in self.dirs if self.TREES[c]}

    def _in(self, directories, controller, name):
        base = self.dirs[controller]
        return next(os.path.join(d, name) for d in directories if os.path.dirname(d) == base)

    def _apply(self, directories, limits):
        applied = {}

        def put(controller, name, value, limit):
            _write(self._in(directories, controller, name), value)
            applied[limit] = limits[limit]

        if limits["cpu_cores"] and "cpu" in self.dirs:
            put("cpu", "cpu.cfs_period_us", str(self.PERIOD_US), "cpu_cores")
            put("cpu", "cpu.cfs_quota_us", str(max(1000, int(limits["cpu_cores"] * self.PERIOD_US))), "cpu_cores")
        if limits["memory_bytes"] and "memory" in self.dirs:
            put("memory", "memory.limit_in_bytes", str(limits["memory_bytes"]), "memory_bytes")
            if os.path.exists(self._in(directories, "memory", "memory.memsw.limit_in_bytes")):
                put("memory", "memory.memsw.limit_in_bytes", str(limits["memory_bytes"]), "memory_bytes")
        if limits["pids"] and "pids" in self.dirs:
            put("pids", "pids.max", str(limits["pids"] + 1), "pids")  # + the init
        if "blkio" in self.dirs and self.io_device:
            for limit, name in (("io_read_bps", "read"), ("io_write_bps", "write")):
                if limits[limit]:
                    put("blkio", f"blkio.throttle.{name}_bps_device", f"{self.io_device} {limits[limit]}", limit)
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


def _keyed(path):
    """A cgroup file of 'key value' lines as a dict of ints."""
    try:
        return {key: int(value) for key, value in (line.split() for line in _read(path).splitlines() if line)}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------------------------
# Inits, the server's side: a pool of inits made ahead of time, the launcher that forks them, and a handle on each
# An init is ordered from the launcher, becomes ready in its cgroup and namespaces, runs one job, and exits.
# ---------------------------------------------------------------------------------------------------------------------

READY_TIMEOUT = 30.0  # seconds an init has to be ready (a fork, a cgroup to join, namespaces to make)
START_TIMEOUT = 60.0  # seconds an init has to start its command (an exec can hang, on a dead network mount say)


class InitPool:
    """Inits made ahead of time, so that a Start pays only for its command's exec, not for a fork, a cgroup and
    namespaces.

    A thread of its own keeps SIZE inits ready. It orders every missing init before it waits for the first, so that
    the launcher forks the next while the last one prepares; a Start may take each as soon as it is ready. It makes
    more only once a Start's answer has gone (refill), not while the Start runs, which would compete with it for the
    CPU, and so a host that cannot make inits is not tried in a loop. A Start that finds none ready makes its own.
    """

    SIZE = 4

    def __init__(self, sandbox, jobs_dir):
        self.sandbox, self.jobs_dir = sandbox, jobs_dir
        self.launcher = Launcher()
        self._ready = []          # the last made is taken first
        self._preparing = set()   # ordered and not yet ready; close() cuts them short
        self._changed = threading.Condition()
        self._refills = 0         # Starts answered so far
        self._tried_at = -1       # the count when the last try began: the next waits for a Start answered since
        self._closed = False
        self._filler = threading.Thread(target=self._fill, name="init-pool", daemon=True)
        self._filler.start()

    def take(self):
        """A ready init, or one made now; one that died while it waited is passed over."""
        while True:
            with self._changed:
                if self._closed:
                    raise shutting_down()
                init = self._ready.pop() if self._ready else None
            if init is None:
                ready, failure = self._make(1)
                if failure:
                    raise failure
                return ready[0]
            if not init.has_gone():
                return init
            init.discard()

    def refill(self):
        with self._changed:
            self._refills += 1
            self._changed.notify_all()

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            for init in self._preparing:
                init.cut_short()
        self._filler.join()
        for init in self._ready:
            init.discard()
        self._ready = []

    def _fill(self):
        name_this_thread("init-pool")
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed or (
                    self._tried_at != self._refills and len(self._ready) < self.SIZE))
                if self._closed:
                    return
                missing, self._tried_at = self.SIZE - len(self._ready), self._refills
            _, failure = self._make(missing, pooled=True)
            if failure and not self._closed:
                logging.error("cannot prepare a job's init: %s", failure)

    def _make(self, count, pooled=False):
        """Orders `count` inits, then waits for each: returns those ready (or, `pooled`, puts each in the pool as soon
        as it is ready), and the first failure (or None)."""
        ordered, ready, failure = [], [], None
        try:
            for _ in range(count):
                ordered.append(InitHandle(self.sandbox, self.jobs_dir, self.launcher))
                with self._changed:
                    self._preparing.add(ordered[-1])
                    if self._closed:
                        ordered[-1].cut_short()
        except Exception as e:
            failure = e
        for init in ordered:
            try:
                init.wait_ready()
            except Exception as e:
                failure = failure or e
                init.discard()
                with self._changed:
                    self._preparing.discard(init)
            else:
                with self._changed:  # in one step: close() cuts short what prepares, never what a Start may hold
                    self._preparing.discard(init)
                    (self._ready if pooled else ready).append(init)
        if failure and self._closed:  # cut short by close(), whatever it broke
            failure = shutting_down()
        return ready, failure


class Launcher:
    """The launcher process, from the server's side (its own side is launcher_main).

    Forking the multi-threaded server to run Python in the child is unsafe, and a fresh interpreter per job costs
    tens of milliseconds; so one bare interpreter loads this file and forks every init from itself. A launcher that
    died is started again at the next order.
    """

    BOOT = ("import importlib.util as u, sys; s = u.spec_from_file_location('jobworker_launcher', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.launcher_main(int(sys.argv[2]))")

    def __init__(self):
        self._lock = threading.Lock()
        self._run()

    def _run(self):
        self._socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._socket.settimeout(READY_TIMEOUT)  # a launcher that stopped reading fails Starts, and holds up none
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", self.BOOT, os.path.abspath(__file__), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={"LANG": "C.UTF-8"},  # none of our secrets
                start_new_session=True)  # a Ctrl-C or hang-up meant for the server must not reach the jobs

    def order(self, channel, sandbox, cgroup_procs):
        """Has the launcher fork an init that will talk to us on `channel`, confined as `sandbox` says."""
        with self._lock:
            if self._process.poll() is not None:
                logging.error("the job launcher exited (status %s); starting another", self._process.returncode)
                self._socket.close()
                self._run()
            try:
                send(self._socket, Message.ORDER, [channel], namespaces=sandbox.namespace_flags,
                     cgroup_procs=cgroup_procs, mounts=sandbox.mounts, no_user_namespaces=sandbox.no_user_namespaces)
            except OSError as e:
                raise Refused("UNAVAILABLE", f"the job launcher is not running: {e}") from None

    def close(self):
        self._socket.close()  # the launcher exits at the end of its socket
        try:
            self._process.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class InitHandle:
    """One job's init, from the server's side: the job's id, its output log, its cgroup, and the init's channel and
    pidfd, from the order to the release."""

    def __init__(self, sandbox, jobs_dir, launcher):
        self.sandbox = sandbox
        self.id = str(uuid.uuid4())
        self.log = self.group = self.channel = self.pidfd = self.command_pid = self.uid = None
        self.applied = {}
        self._holds_uid = False  # a transient uid, given back once no process of the job can have it
        self._lock = threading.Lock()  # what is said to the init or done to its cgroup must not race release()
        self._released = False
        self._final_usage = {}
        with contextlib.ExitStack() as undo:
            undo.callback(self.discard)
            self.log = OutputLog(jobs_dir, self.id)
            self.group = sandbox.cgroups.create(self.id) if sandbox.cgroups else None
            self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with theirs:
                launcher.order(theirs.fileno(), sandbox, sandbox.cgroups.procs_files(self.group) if self.group else [])
            undo.pop_all()

    def wait_ready(self):
        """Waits for the init's first words: its pidfd, then that it is ready (or why not)."""
        self.channel.settimeout(READY_TIMEOUT)
        _, (self.pidfd,) = self._expect(Message.INIT, fds=1)
        self._expect(Message.READY)

    def cut_short(self):
        """Makes wait_ready() return at once, failed (from another thread, at shutdown)."""
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_RDWR)

    def has_gone(self):
        """Whether a ready init has exited, or said something (it says nothing until it is given a job: a failure)."""
        ready = select.poll()  # not select(): a busy server's descriptors go past 1024
        ready.register(self.pidfd, select.POLLIN)
        ready.register(self.channel, select.POLLIN)
        return bool(ready.poll(0))

    def start(self, command, limits, environment, working_directory):
        """Gives the init its job, and returns once the command runs: the read ends of its stdout and stderr."""
        sandbox = self.sandbox
        self.applied = sandbox.cgroups.apply(self.group, limits) if self.group else {}
        if sandbox.ids:
            self.uid, self._holds_uid = sandbox.ids.take(), True
        job = {"command": command, "env": environment, "cwd": working_directory,
               "uid": self.uid if sandbox.ids else sandbox.uid, "gid": self.uid if sandbox.ids else sandbox.gid,
               "tmp_size": self.applied.get("memory_bytes", 0)}
        readers, theirs = [], []  # the init gets its own copies of theirs
        try:
            for _ in range(2):
                read, write = os.pipe2(os.O_CLOEXEC)
                readers.append(read)
                theirs.append(write)
            theirs.append(os.memfd_create("job", os.MFD_CLOEXEC))  # a command line of any size, in one message
            _write_all(theirs[-1], json.dumps(job).encode())
            self.channel.settimeout(START_TIMEOUT)
            send(self.channel, Message.JOB, theirs)
            _, (pidfd,) = self._expect(Message.STARTED, job, fds=1)
            try:
                self.command_pid = pid_of(pidfd)  # as this server's PID namespace numbers it
            finally:
                os.close(pidfd)
            send(self.channel, Message.NOTED)
            return readers
        except BaseException:
            for fd in readers:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)

    def _expect(self, kind, job=None, fds=0):
        """The init's next message, which must be `kind` with `fds` descriptors: (fields, fds). Anything else is a
        failure, after which the init exits; a failure of the `job` it was given says what in it was wrong."""
        try:
            said, fields, received = receive(self.channel, fds)
        except TimeoutError:
            raise Refused("UNAVAILABLE", f"the job's init did not answer within {self.channel.gettimeout():g} s"
                          ) from None
        except OSError as e:
            raise Refused("INTERNAL", f"the job's init did not answer: {e}") from None
        if said is kind and len(received) == fds:
            return fields, received
        for fd in received:
            os.close(fd)
        if said is not Message.FAILED:  # None: the channel closed with nothing said (the init, or the launcher, died)
            raise Refused("INTERNAL", "the job's init went away before it said why" if said is None
                          else f"the job's init said {said.value} out of turn")
        code, stage = fields.get("errno"), fields.get("stage")
        if stage == "workdir":
            raise Refused("INVALID_ARGUMENT", f"cannot enter the working directory {job['cwd'][:256]!r}: "
                                              f"{os.strerror(code)}")
        if stage in ("launch", "exec") and code in (errno.EAGAIN, errno.ENOMEM):  # out of processes or memory
            what = repr(job["command"][0]) if job else "the job's init"
            raise Refused("RESOURCE_EXHAUSTED", f"cannot start {what}: {os.strerror(code)}")
        if stage == "exec":
            raise Refused("INVALID_ARGUMENT", f"cannot execute {job['command'][0]!r}: {os.strerror(code)}")
        raise Refused("INTERNAL", f"cannot set up the job ({stage}): {fields.get('message')}")

    def signal(self, sig):
        """Asks the init to send `sig` to every process of the job; never waits for an init that does not read."""
        with self._lock:
            if not self._released:
                self._tell(sig)

    def kill(self):
        """SIGKILL to every process of the job, by its init (which then says how the command ended)."""
        with self._lock:
            if not self._released and not self._tell(signal.SIGKILL):
                self._kill_init()

    def kill_init(self):
        """SIGKILL to the init itself and to the job's cgroup, for an init that does not carry out a kill. What the
        job still runs dies with the init's PID namespace, or (without one) comes to the launcher, which kills it."""
        with self._lock:
            if not self._released:
                self._kill_init()

    def _tell(self, sig):
        try:
            send(self.channel, Message.SIGNAL, flags=socket.MSG_DONTWAIT, signal=int(sig))
            return True
        except OSError:  # the init has gone (and so has the job), or it is stopped and its channel full
            return False

    def _kill_init(self):
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        if self.group:
            try:
                self.sandbox.cgroups.kill(self.group)
            except OSError as e:
                logging.warning("cgroup kill of job %s: %s", self.id, e)

    def usage(self):
        if self._released or not self.group:
            return self._final_usage
        try:
            return self.sandbox.cgroups.usage(self.group)
        except OSError:
            return {}

    def release(self):
        """Called once the init has exited: returns its report of how the command ended ({} if it made none: it was
        killed) and what the job used, then lets the init's channel, pidfd and cgroup go."""
        report = {}
        try:
            self.channel.setblocking(False)
            while True:
                said, fields, _ = receive(self.channel)
                if said is None:
                    break
                if said is Message.ENDED:
                    report = _plausible(fields)
        except OSError:  # nothing more to read
            pass
        try:
            with self._lock:
                self._final_usage = self.usage()
                self._released = True
            return report, self._final_usage
        finally:
            self.channel.close()
            os.close(self.pidfd)
            self._let_go()

    def discard(self):
        """Ends an init that will run no job (its Start failed, or the server is closing) and removes what it had."""
        if self.pidfd is not None:
            self._kill_init()
            exited = select.poll()
            exited.register(self.pidfd, select.POLLIN)
            exited.poll(KILL_GRACE * 1000)
            os.close(self.pidfd)
        if self.channel is not None:
            self.channel.close()  # an init not yet ready exits when it finds its channel closed
        self._let_go()
        if self.log:
            self.log.remove()

    def _let_go(self):
        """Removes the job's cgroup, then gives its uid back: a group that cannot be removed may still hold a process
        of the job, which keeps its uid."""
        if self.group:
            try:
                self.sandbox.cgroups.remove(self.group)
            except OSError as e:
                logging.error("cannot remove the cgroup of job %s, whose uid is kept from other jobs: %s", self.id, e)
                return
        if self._holds_uid:
            self.sandbox.ids.give_back(self.uid)
            self._holds_uid = False

    def isolation(self):
        """What confines the job, as the fields of a status's Isolation (limits: those of Limits)."""
        sandbox = self.sandbox
        return {"mode": sandbox.mode, "cgroup": sandbox.cgroups.version if self.group else "",
                "namespaces": list(sandbox.namespaces), "limits": dict(self.applied),
                "user": f"uid {self.uid} (transient)" if sandbox.ids else sandbox.user}


def _plausible(report):
    """An init's ENDED report, as far as it holds what a real one would (an init shares its user with the job)."""
    exit_code, sig, stopped = report.get("exit_code"), report.get("signal"), report.get("stopped") is True
    if type(exit_code) is int and 0 <= exit_code <= 255:
        return {"exit_code": exit_code, "stopped": stopped}
    if type(sig) is int and 0 < sig <= signal.SIGRTMAX:
        return {"signal": sig, "stopped": stopped}
    return {}


def pid_of(pidfd):
    """The pid a pidfd refers to, as this process's PID namespace numbers it."""
    for line in _read(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise OSError(errno.ESRCH, "no pid in the pidfd's fdinfo")


# ---------------------------------------------------------------------------------------------------------------------
# The launcher and the inits: the processes between the server and each job's command
# Standard library only, and none of the modules imported on first use: see the top of the file.
# ---------------------------------------------------------------------------------------------------------------------

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def launcher_main(fd):
    """The launcher process: forks an init for every order, until the server goes away (its socket ends: only the
    server holds the other end)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the server blocks its shutdown signals; jobs must not
    # A job without a PID namespace can kill its init (they share a user): what it leaves comes to us, and ends.
    libc("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    orders = socket.socket(fileno=fd)
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup pipe wakes the loop
    inits = set()
    while True:
        ready, _, _ = select.select([orders, wake_r], [], [])
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 4096)
        inits -= reap_children().keys()  # at every wakeup: a SIGCHLD lost to a full pipe loses no child
        kill_orphans(inits)  # reaped at their SIGCHLD; their own children come to us then
        if orders not in ready:
            continue
        try:
            kind, order, fds = receive(orders, 1)
        except OSError as e:
            print(f"jobworker launcher: {e}", file=sys.stderr)
            continue
        if kind is None:  # the server has gone: what jobs left comes to us until none is left, and ends
            while kill_orphans(inits):
                os.waitpid(-1, 0)
                inits -= reap_children().keys()
            os._exit(0)
        try:
            if kind is Message.ORDER and len(fds) == 1:
                inits.add(fork_init(order, fds[0], own_pid_namespace, [fd, wake_r, wake_w, own_pid_namespace]))
        except OSError as e:  # the init's channel says why
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fds[0])) as channel:
                send(channel, Message.FAILED, stage="launch", errno=e.errno, message=str(e))
        finally:
            for received in fds:
                os.close(received)


def kill_orphans(inits):
    """SIGKILL to every child of the launcher but its inits: what a job without a PID namespace left when its init
    was killed. Returns whether there was one."""
    orphans = set(children_of(os.getpid())) - inits
    for orphan in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    return bool(orphans)


def fork_init(order, channel, own_pid_namespace, launcher_fds):
    """Forks the init of one job, as pid 1 of a new PID namespace if the order says so; returns its pid."""
    new_pid_namespace = order["namespaces"] & CLONE_NEWPID
    if new_pid_namespace:
        libc("unshare", CLONE_NEWPID)  # our next child is pid 1 of a new namespace; we stay in ours
    pid = -1
    try:
        pid = os.fork()
    finally:
        if new_pid_namespace and pid != 0 and _libc.setns(own_pid_namespace, CLONE_NEWPID) != 0:
            os._exit(1)  # later children would go into that namespace: the server starts another launcher
    if pid == 0:
        try:
            for fd in launcher_fds:
                os.close(fd)
            signal.set_wakeup_fd(-1)
            Init(channel, order).run()
        except OSError:  # the server has gone
            pass
        finally:
            os._exit(1)  # an init never returns into the launcher's loop
    return pid


def reap_children():
    """Reaps every child that has exited: returns {pid: its wait status}."""
    reaped = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = status


class Init:
    """The first process of every job: pid 1 of its PID namespace, between the server and the command.

    Made ahead of its job, it joins the job's cgroup, enters the job's other namespaces, makes the job's mounts,
    brings loopback up, gives up what of the server's privilege a job could inherit, and says it is ready. Given a
    job, it becomes the job's user for good, enters the job's working directory and starts the command. Then
    it does what the kernel expects of an init and what the server needs of a job: it reaps every zombie and passes
    the server's signals on to every process of the job. Once the command exits it reports how, ends whatever the
    command left running, and exits; if the server goes away (its end of the channel closes), it ends the job first.
    One init runs one job.
    """

    FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, channel, order):
        self.channel = socket.socket(fileno=channel)
        self.order = order
        self.pid_namespace = bool(order["namespaces"] & CLONE_NEWPID)
        self.command_pid = None
        self.signalled = self.caught = False  # the server signalled the job; its command caught such a signal

    def run(self):
        name_this_thread("jobworker-init")
        pidfd = os.pidfd_open(os.getpid())
        send(self.channel, Message.INIT, [pidfd])  # first, so that the server knows who says the rest
        os.close(pidfd)
        self._catch_signals()
        with self._stage("cgroup"):
            for procs in self.order["cgroup_procs"]:
                _write(procs, "0")  # before anything of the job runs, so that nothing it forks is ever outside
        with self._stage("namespaces"):
            self._enter_namespaces()
        with self._stage("privilege"):
            self._give_up_privilege()
        send(self.channel, Message.READY)
        kind, job, fds = receive(self.channel, 3)
        if kind is not Message.JOB or len(fds) != 3:
            os._exit(0)  # the server no longer needs us
        stdout, stderr, spec = fds
        with self._stage("user"):
            job = json.loads(os.pread(spec, os.fstat(spec).st_size, 0))
            os.close(spec)
            if job["tmp_size"] and self.order["mounts"]:  # a limited job's /tmp holds as much as its memory limit
                for point in self.order["mounts"]["tmp"]:
                    libc("mount", b"tmpfs", point.encode(), b"tmpfs", MS_REMOUNT | MS_NOSUID | MS_NODEV,
                         f"size={job['tmp_size']}".encode())
            if job["uid"] != os.geteuid():
                for capability in range(int(_read("/proc/sys/kernel/cap_last_cap")) + 1):
                    libc("prctl", PR_CAPBSET_DROP, capability, 0, 0, 0)  # no exec can give the job a capability
                os.setresgid(job["gid"], job["gid"], job["gid"])  # for good: nothing of the job runs as root
                os.setresuid(job["uid"], job["uid"], job["uid"])
                libc("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)  # the job's user may not ptrace its init, whatever the host
            with contextlib.suppress(OSError):  # a session keyring of its own, not the server's (ENOSYS: no keys)
                syscall("keyctl", KEYCTL_JOIN_SESSION_KEYRING, None)
        with self._stage("workdir"):
            os.chdir(job["cwd"])  # as the job's user, in the job's mount namespace: where the job can go
        with self._stage("exec"):
            self._execute(job, stdout, stderr)
        try:
            pidfd = os.pidfd_open(self.command_pid)
            send(self.channel, Message.STARTED, [pidfd])
            os.close(pidfd)
            kind, _, _ = receive(self.channel)  # the command is not reaped before the server has read its pid
            if kind is Message.NOTED:
                fields = self._supervise()
                # Stopped: a signal of the server's ended the command, or the command caught it and then exited. One
                # that exits with a code without catching it exited by itself (the signal came as it was exiting).
                stopped = self.signalled and ("signal" in fields or self.caught)
                send(self.channel, Message.ENDED, stopped=stopped, **fields)
        finally:  # whatever happened, nothing of the job outlives its init
            self._end_everything()
        os._exit(0)

    @contextlib.contextmanager
    def _stage(self, stage):
        """A stage of the init's work; if it fails, the server is told at which, and why, and the init exits."""
        try:
            yield
        except (OSError, ValueError, KeyError) as e:
            with contextlib.suppress(OSError):
                send(self.channel, Message.FAILED, stage=stage, errno=getattr(e, "errno", None) or errno.EINVAL,
                     message=str(e)[:500])
            os._exit(1)

    def _catch_signals(self):
        """Signals arrive as bytes on a pipe the main loop waits on; our descriptors stay ours."""
        self.wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in self.FORWARDED + (signal.SIGCHLD,):
            signal.signal(sig, lambda *_: None)
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2:  # so that the command inherits nothing of ours (posix_spawn has no close_fds)
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)

    def _enter_namespaces(self):
        flags = self.order["namespaces"] & (CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWCGROUP)
        if flags:
            libc("unshare", flags)  # the cgroup namespace's root is the job's group, which we are in already
        if flags & CLONE_NEWNS:
            self._private_mounts(self.order["mounts"])
        if flags & CLONE_NEWNET:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                request = struct.pack("16sH14x", b"lo", 0)
                flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
                fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
        if not self.pid_namespace:
            libc("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come to us, not to the host's init

    def _private_mounts(self, mounts):
        """The job's view of the file system: the host's, nosuid, and read-only for a transient user, who so has
        nowhere shared to leave a file; its own /tmp, /var/tmp and /dev/shm; and cgroup and mqueue file systems
        mounted again, so that they show its own group and IPC namespace, not every job's."""
        libc("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # our mounts stay ours
        for point, fstype, data in mounts["again"]:  # read-write as the host's are (else EBUSY); read-only next
            try:
                libc("mount", fstype.encode(), point.encode(), fstype.encode(), MS_NOSUID | MS_NODEV | MS_NOEXEC,
                     data.encode() or None)
            except OSError as e:  # EBUSY: the job has no group of its own in this tree, so it is shown none of it
                if e.errno != errno.EBUSY:
                    raise
                libc("mount", b"tmpfs", point.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                     b"size=4k,nr_inodes=1,mode=555")
        if mounts["nosuid"]:
            protect_mounts(MOUNT_ATTR_NOSUID | (MOUNT_ATTR_RDONLY if mounts["read_only"] else 0))
        for point in mounts["tmp"]:
            libc("mount", b"tmpfs", point.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                 f"mode=1777,size={TMP_SIZE}".encode())
        if self.pid_namespace:
            libc("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)

    def _give_up_privilege(self):
        """Nothing of the server's privilege but its ids reaches the job, and no exec gives the job more: no ambient
        or inheritable capability, no supplementary group, no setuid bit or file capability (no_new_privs), no user
        namespace (in which it would have every capability), no OOM protection. (The bounding set is emptied once the
        job's user is known: a job run as root by --run-as root keeps root's capabilities.)"""
        libc("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header = ctypes.create_string_buffer(struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0), 8)
        sets = ctypes.create_string_buffer(24)  # (effective, permitted, inheritable) for capabilities 0-31, 32-63
        libc("capget", header, sets)
        sets[8:12] = sets[20:24] = bytes(4)
        libc("capset", header, sets)
        libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if self.order["no_user_namespaces"]:
            install_seccomp_filter(no_user_namespaces_filter(os.uname().machine))
        if os.geteuid() == 0:
            os.setgroups([])
        if int(_read("/proc/self/oom_score_adj")) < 0:
            _write("/proc/self/oom_score_adj", "0")

    def _execute(self, job, stdout, stderr):
        os.environ["PATH"] = job["env"]["PATH"]  # where posix_spawnp looks for the command: the client's PATH, if set
        try:  # posix_spawn: a vfork and an exec, in C, which need not copy this process's memory
            self.command_pid = os.posix_spawnp(
                job["command"][0], job["command"], job["env"], setsid=True, setsigmask=(),
                setsigdef=self.FORWARDED + (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stderr, 2)])
        finally:
            os.close(stdout)
            os.close(stderr)

    def _supervise(self):
        """Reaps, forwards and obeys until the command has exited: returns how it ended, or that the server went."""
        self.channel.setblocking(False)
        while True:
            ready, _, _ = select.select([self.wake_r, self.channel], [], [])
            signals = b""
            with contextlib.suppress(BlockingIOError):
                signals = os.read(self.wake_r, 4096)
            status = reap_children().get(self.command_pid)  # at every wakeup, before any signal is passed on
            if status is not None:
                code = os.waitstatus_to_exitcode(status)
                return {"exit_code": code} if code >= 0 else {"signal": -code}
            for sig in set(signals) - {signal.SIGCHLD}:
                self._signal_all(sig)
            if self.channel in ready:
                try:
                    kind, fields, _ = receive(self.channel)
                except BlockingIOError:
                    continue
                if kind is None:  # the server has gone, and the job goes with it
                    self._signal_all(signal.SIGKILL)
                    return {"signal": signal.SIGKILL}
                if kind is Message.SIGNAL:
                    self.signalled = True
                    self.caught = self.caught or self._catches(fields["signal"])
                    self._signal_all(fields["signal"])

    def _catches(self, sig):
        """Whether the command has a handler for `sig` (if it cannot be told: yes)."""
        try:
            status = _read(f"/proc/{self.command_pid}/status")
            caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
            return bool(int(caught, 16) >> (sig - 1) & 1)
        except (OSError, StopIteration, ValueError):
            return True

    def _signal_all(self, sig):
        """`sig` to every process of the job but us; a SIGTERM wakes stopped ones too, so that they can act on it."""
        for each in (sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,):
            with contextlib.suppress(ProcessLookupError):
                if self.pid_namespace:
                    os.kill(-1, each)  # every process in our namespace but us
                else:
                    os.killpg(self.command_pid, each)
        if sig == signal.SIGKILL and not self.pid_namespace:
            for child in children_of(os.getpid()):  # what left the process group still comes to us, as subreaper
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)

    def _end_everything(self):
        """The command has exited: whatever it left running ends with it, as a container's processes do."""
        while True:
            self._signal_all(signal.SIGKILL)
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


# ---------------------------------------------------------------------------------------------------------------------
# Output: from a job's pipes into its log on disk (the pump), and from the log to each stream (a reader)
# A job's output is never held in the server's memory: any number of readers follow it at their own pace.
# ---------------------------------------------------------------------------------------------------------------------

STDOUT, STDERR = 0, 1
F_SETPIPE_SZ = 1031


class OutputPump:
    """One thread that moves every job's output from its pipes into its log, and notices when each init has exited.

    Level-triggered epoll and large splices: a quiet job costs nothing, and a busy one is taken in a MiB at a time.
    Once a job's init has exited, what is left in the job's pipes is taken in (no more: a process elsewhere may still
    hold them) and the job is handed to `on_end`, which must not keep this thread. Output past `max_output` bytes, or
    refused by the disk, is drained into /dev/null and counted: a job is never blocked or killed for its output.
    """

    SPLICE = 1 << 20  # bytes moved at most in one splice(), and the pipe size asked for

    def __init__(self, on_end, max_output=DEFAULT_MAX_OUTPUT, space=None):
        self._on_end, self._max_output, self._space = on_end, max_output, space
        self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._watched = {}  # fd -> (job, source): a pipe, or (job, None) for the init's pidfd
        self._open = {}     # job -> {fd: source} of its pipes that have not ended
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._epoll.register(self._stop_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="output-pump", daemon=True)
        self._thread.start()

    def watch(self, job, out_r, err_r):
        """Takes in the job's output from now on; the pipes are the pump's to close once watched."""
        pipes = {out_r: STDOUT, err_r: STDERR}
        with self._lock:
            try:
                for fd, source in [*pipes.items(), (job.init.pidfd, None)]:
                    if source is not None:
                        _enlarge_pipe(fd, self.SPLICE)
                    self._epoll.register(fd, select.EPOLLIN)
                    self._watched[fd] = (job, source)
            except OSError:
                for fd in [*pipes, job.init.pidfd]:
                    if self._watched.pop(fd, None):
                        self._epoll.unregister(fd)
                raise
            self._open[job] = pipes

    def stop(self):
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd, (_, source) in self._watched.items():
            if source is not None:  # a pipe of a job that did not end (its init was killed, and did not go)
                os.close(fd)
        for fd in (self._stop_r, self._stop_w, self._null):
            os.close(fd)
        self._epoll.close()

    def _run(self):
        name_this_thread("output-pump")
        while True:
            ended = []  # pipes closed once the round is done: no number may be reused while events of it are pending
            for fd, _ in self._epoll.poll():
                if fd == self._stop_r:
                    return
                with self._lock:
                    job, source = self._watched.get(fd, (None, None))
                try:
                    if job is None:
                        continue  # its job ended earlier in this round
                    if source is None:
                        ended += self._end(job)
                    elif self._take(job, fd, source) == 0:
                        ended.append(self._unwatch(job, fd))
                except Exception:  # a bug: logged, and the pump goes on for every other job
                    logging.exception("output pump, job %s", job.id)
            for fd in ended:
                os.close(fd)

    def _take(self, job, fd, source):
        """Moves what waits in a pipe into the job's log, or drops it (past the cap, or once the disk has refused the
        job's output: what is kept is always the start of the output). Returns the bytes moved, 0 once the pipe has
        ended, None if nothing waits."""
        log, room = job.log, self._max_output - job.log.size
        keep = not log.dropping and room > 0
        try:
            if keep:
                return log.take_from(source, fd, min(room, self.SPLICE))
            return log.drop_from(fd, self._null, self.SPLICE)
        except BlockingIOError:
            return None
        except OSError as e:
            if not keep:
                logging.error("job %s: cannot drain its output: %s", job.id, e)
                return 0
            log.dropping = True
            if e.errno in (errno.ENOSPC, errno.EDQUOT) and self._space:
                self._space.full(job.id)
            else:
                logging.error("job %s: cannot keep its output, which is dropped from now on: %s", job.id, e)
            return self._take(job, fd, source)  # dropped, then

    def _unwatch(self, job, fd):
        with self._lock:
            self._epoll.unregister(fd)
            del self._watched[fd]
            self._open.get(job, {}).pop(fd, None)
        return fd

    def _end(self, job):
        """The job's init has exited: takes in what is left in its pipes, and hands the job on; returns its pipes."""
        self._unwatch(job, job.init.pidfd)
        pipes = self._open.pop(job)
        for fd, source in pipes.items():
            for _ in range(4):  # a pipe holds at most one splice, unless a writer elsewhere still fills it
                if not self._take(job, fd, source):  # ended, or nothing waits: no more
                    break
            self._unwatch(job, fd)
        self._on_end(job)
        return list(pipes)


def _enlarge_pipe(fd, size):
    """Fewer, larger splices for a job that writes a lot; a pipe over the host's limits stays as it is."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)


class OutputLog:
    """A job's output on disk: every byte in arrival order (`output`), and where each run of one stream begins (`runs`).

    One writer (the pump) appends; `size`, `runs`, `closed` and `removed` change under `cond`, which wakes the
    readers. The log leaves the page cache behind its writer, and behind each reader, WINDOW bytes at a time: a job
    that writes gigabytes does not push the host's own files out of memory. What the pump drops is counted in
    `dropped`.
    """

    RUN = struct.Struct("<QB")  # the offset where a run begins, and its source (STDOUT or STDERR)
    WINDOW = 8 << 20

    OUTPUT_FILE, RUNS_FILE = "output", "runs"

    def __init__(self, jobs_dir, name, existing=False):
        """A new log, in a new directory `name` of `jobs_dir` (a descriptor); or, `existing`, one an earlier server left
        there, to read."""
        self.jobs_dir, self.name = jobs_dir, name
        self._output = self._runs = self._source = None
        self._written_back = self._uncached = 0  # where the window handed to the disk last ends; what left memory
        self.size = self.runs = self.dropped = 0
        self.modified_at = None  # when an existing log was last written
        self.dropping = False  # the disk refused some of the output: the rest is dropped
        self.closed = self.removed = False
        self.cond = threading.Condition()
        if existing:
            output, runs = self.open_files()
            with output, runs:
                found = os.fstat(output.fileno())
                self.size, self.modified_at = found.st_size, found.st_mtime
                self.runs = self._runs_within(runs.fileno(), self.size)
            self.closed = True
            return
        os.mkdir(name, 0o700, dir_fd=jobs_dir)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            with self.directory() as directory:
                self._output = open_file(directory, self.OUTPUT_FILE, flags)
                try:
                    self._runs = open_file(directory, self.RUNS_FILE, flags)
                except OSError:
                    os.close(self._output)
                    raise
        except OSError:
            shutil.rmtree(name, dir_fd=jobs_dir, ignore_errors=True)
            raise

    def directory(self):
        """The log's directory (the job's), opened for a with block: a descriptor."""
        return opened_directory(self.jobs_dir, self.name)

    def open_files(self):
        """The log's output and runs files, opened to read (unbuffered)."""
        with self.directory() as directory:
            output = open(open_file(directory, self.OUTPUT_FILE, os.O_RDONLY), "rb", buffering=0)
            try:
                return output, open(open_file(directory, self.RUNS_FILE, os.O_RDONLY), "rb", buffering=0)
            except BaseException:
                output.close()
                raise

    def _runs_within(self, runs, size):
        """The runs of an existing log that begin within its output: a server that ended while it wrote (a crash)
        may have begun a run it wrote nothing of."""
        count = os.fstat(runs).st_size // self.RUN.size
        while count and RunIndex(runs, count)[count - 1][0] >= size:
            count -= 1
        if size and not count:
            raise ValueError("its output has no runs")
        return count

    def take_from(self, source, pipe, limit):
        """Moves up to `limit` bytes waiting in `pipe` into the log, inside the kernel: returns how many (0: the pipe
        has ended); BlockingIOError if none wait."""
        new_run = source != self._source
        if new_run:  # before the bytes, so that no byte on disk is without its run, whenever the server may end
            os.pwrite(self._runs, self.RUN.pack(self.size, source), self.runs * self.RUN.size)
        count = os.splice(pipe, self._output, limit, offset_dst=self.size, flags=os.SPLICE_F_NONBLOCK)
        if not count:
            return 0
        self._source = source
        with self.cond:  # readers see the bytes and their run only now, once both are in the files
            self.size += count
            self.runs += new_run
            self.cond.notify_all()
        if self.size - self._written_back >= self.WINDOW:
            self._write_back()
        return count

    def drop_from(self, pipe, sink, limit):
        """Drains up to `limit` bytes waiting in `pipe` into `sink` (/dev/null), counted as dropped: returns how many
        (0: the pipe has ended); BlockingIOError if none wait."""
        count = os.splice(pipe, sink, limit, flags=os.SPLICE_F_NONBLOCK)
        self.dropped += count
        return count

    def _write_back(self):
        """Hands the latest window to the disk, and drops from memory the one before, which is written by now."""
        start, end = self._written_back, self.size
        _libc.sync_file_range(self._output, ctypes.c_int64(start), ctypes.c_int64(end - start),
                              SYNC_FILE_RANGE_WRITE)
        _libc.sync_file_range(self._output, ctypes.c_int64(self._uncached), ctypes.c_int64(start - self._uncached),
                              SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
        drop_from_memory(self._output, self._uncached, start)
        self._uncached, self._written_back = start, end

    def close(self):
        """No more output: the readers read what there is, and end."""
        if self._output is not None:
            with contextlib.suppress(OSError):  # a run begun and never written is no run
                os.ftruncate(self._runs, self.runs * self.RUN.size)
            os.close(self._output)
            os.close(self._runs)
            self._output = self._runs = None
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def remove(self):
        """Deletes the log, and the job's directory with it (the job was removed, or its Start failed): its readers
        wake, and end."""
        self.close()
        with self.cond:
            self.removed = True
            self.cond.notify_all()
        shutil.rmtree(self.name, dir_fd=self.jobs_dir, ignore_errors=True)  # which follows no symbolic link (on Linux)


def drop_from_memory(fd, start, end):
    """Asks the kernel to let a file's written pages go from the page cache: a hint, never worth an error."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


class LogReader:
    """One reader's place in an OutputLog: iterating yields (source, offset, data) until the log is closed and read,
    or removed (its job was: the log's `removed` says so).

    Its files are open only while it is iterated, so a reader that is never started holds nothing.
    """

    def __init__(self, output_log, offset, chunk=STREAM_CHUNK):
        self._log, self._chunk, self.offset = output_log, chunk, offset
        self.cancelled = False

    def cancel(self):
        """Wakes the reader and ends it; from another thread, when the client goes away."""
        with self._log.cond:
            self.cancelled = True
            self._log.cond.notify_all()

    def __iter__(self):
        output_log = self._log
        with contextlib.ExitStack() as files:
            try:
                output, runs_file = (files.enter_context(file) for file in output_log.open_files())
            except FileNotFoundError:
                if output_log.removed:  # before the reader began
                    return
                raise
            dropped = self.offset
            run = source = run_end = None  # the run that holds offset, its source, and its end once another begins
            try:
                while True:
                    with output_log.cond:
                        output_log.cond.wait_for(lambda: self.offset < output_log.size or output_log.closed
                                                 or self.cancelled or output_log.removed)
                        if self.cancelled or output_log.removed or self.offset >= output_log.size:
                            return
                        size, runs = output_log.size, RunIndex(runs_file.fileno(), output_log.runs)
                    if run is None:
                        run = bisect.bisect_right(runs, self.offset, key=lambda entry: entry[0]) - 1
                        source = runs[run][1]
                    if run_end is None and run + 1 < len(runs):
                        run_end = runs[run + 1][0]
                    if run_end is not None and self.offset >= run_end:
                        run, run_end, source = run + 1, None, runs[run + 1][1]
                        continue
                    end = size if run_end is None else run_end
                    data = os.pread(output.fileno(), min(self._chunk, end - self.offset), self.offset)
                    yield source, self.offset, data
                    self.offset += len(data)
                    if self.offset - dropped >= OutputLog.WINDOW:
                        drop_from_memory(output.fileno(), dropped, self.offset)
                        dropped = self.offset
            finally:
                drop_from_memory(output.fileno(), dropped, self.offset)


class RunIndex:
    """A log's runs file as a sequence of (offset, source), to bisect."""

    def __init__(self, fd, count):
        self._fd, self._count = fd, count

    def __len__(self):
        return self._count

    def __getitem__(self, index):
        if not 0 <= index < self._count:
            raise IndexError(index)
        return OutputLog.RUN.unpack(os.pread(self._fd, OutputLog.RUN.size, index * OutputLog.RUN.size))


# ---------------------------------------------------------------------------------------------------------------------
# Client: a connection to a server, with the calls a script needs, and how to show what they return
# ---------------------------------------------------------------------------------------------------------------------

class Client:
    """A connection to a jobworker server."""

    def __init__(self, addr, cert, key, ca):
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.secure_channel(addr, channel_credentials(cert, key, ca), options=options)
        self.stub = pb_grpc.JobWorkerStub(self.channel)

    def close(self):
        self.channel.close()

    def start(self, command, env=None, working_directory="", **limits):
        request = pb.StartRequest(command=command, limits=pb.Limits(**limits), env=env or {},
                                  working_directory=working_directory)
        return self.stub.Start(request).job_id

    def stop(self, job_id, force=False, timeout=None):
        request = pb.StopRequest(job_id=job_id, force=force)
        if timeout is not None:
            request.timeout_seconds = timeout
        return self.stub.Stop(request)

    def query(self, job_id):
        return self.stub.Query(pb.QueryRequest(job_id=job_id))

    def list(self, limit=None, state=None, owner=None):
        """The newest `limit` jobs the caller may see (None: every one), in a state or of an owner if asked, newest
        first; fetched a page at a time."""
        jobs, token = [], ""
        while limit is None or len(jobs) < limit:
            size = MAX_LIST_PAGE_SIZE if limit is None else min(MAX_LIST_PAGE_SIZE, limit - len(jobs))
            page = self.stub.List(pb.ListRequest(page_size=size, page_token=token, state=state, owner=owner))
            jobs += page.jobs
            token = page.next_page_token
            if not token:
                break
        return jobs

    def remove(self, job_id):
        return self.stub.Remove(pb.RemoveRequest(job_id=job_id))

    def wait(self, job_id, retries=8):
        """The job's final status, once it has ended; if the connection drops, reconnects with backoff and waits on."""
        failures = 0
        while True:
            try:
                return self.stub.Wait(pb.WaitRequest(job_id=job_id))
            except grpc.RpcError as e:
                failures = _back_off(e, failures, retries)

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
                failures = _back_off(e, failures, retries)


def _back_off(error, failures, retries):
    """Raises `error` unless the server was unavailable and fewer than `retries` tries in a row have failed; else waits
    before the next try, longer after each failure, and returns how many have failed."""
    if error.code() != grpc.StatusCode.UNAVAILABLE or failures >= retries:
        raise error
    failures += 1
    time.sleep(min(0.1 * 2 ** failures, 5.0))
    return failures


def exit_status(status):
    """The exit status `ssh host cmd` would give: the command's own, or 128+N if signal N ended it."""
    if status.HasField("exit_code"):
        return status.exit_code
    return 128 + status.signal if status.signal else 255


def signal_name(number):
    """SIGTERM, SIGRTMIN+3, or the number itself for a signal this host has no name for."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return str(number)


COLUMNS = ("JOB ID", "STATE", "RESULT", "OWNER", "STARTED", "DURATION", "OUTPUT", "COMMAND")
RIGHT_ALIGNED = {"OUTPUT"}


def table(statuses):
    """Jobs as lines of aligned columns under a header: each column as wide as its widest cell, so that no owner or
    result, however long, moves the columns after it; the command last, as long as it is."""
    now = time.time()
    rows = [COLUMNS] + [_cells(status, now) for status in statuses]
    widths = [max(_width(row[column]) for row in rows) for column in range(len(COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [" " * (width - _width(cell)) + cell if name in RIGHT_ALIGNED else cell + " " * (width - _width(cell))
                 for name, cell, width in zip(COLUMNS, row, widths)]
        lines.append("  ".join(cells + [row[-1]]))
    return lines


def _cells(status, now):
    if status.HasField("exit_code"):
        result = f"exit {status.exit_code}"
    elif status.signal:
        result = f"signal {status.signal} ({signal_name(status.signal)})"
    else:
        result = f"pid {status.pid}"
    started = status.started_at.ToNanoseconds() / 1e9
    ended = status.ended_at.ToNanoseconds() / 1e9 if status.HasField("ended_at") else now  # the client's clock
    output = format_size(status.output_bytes)
    if status.output_dropped_bytes:  # past the server's --max-output, or on a full disk
        output += f" (+{format_size(status.output_dropped_bytes)} dropped)"
    command = _printable(shlex.join(status.command)) + (" …" if status.command_truncated else "")  # List cut it
    return (_printable(status.job_id), pb.JobState.Name(status.state), result, _printable(status.owner) or "-",
            time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)), format_duration(max(0.0, ended - started)),
            output, command)


def format_duration(seconds):
    """12.3s, 3m12s, 2h05m, 3d04h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, hours, days = int(seconds) // 60, int(seconds) // 3600, int(seconds) // 86400
    if seconds < 3600:
        return f"{minutes}m{int(seconds) % 60:02d}s"
    return f"{hours}h{minutes % 60:02d}m" if seconds < 86400 else f"{days}d{hours % 24:02d}h"


def format_size(size):
    """26 B, 1.5 KiB, 12.0 MiB: binary multiples, as the size flags take them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024 or unit == "EiB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def _printable(text):
    """Text as one line a terminal shows as it is: a newline or an escape sequence (a CN may hold one) is escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _width(text):
    """The columns a terminal gives text: two for a wide character, none for a combining one."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def to_json(message):
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `serve`, and the client's subcommands
# ---------------------------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
CERTS = os.path.join(HERE, "certs")
SHUTDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return serve(args) if args.action == "serve" else run_client(args)
    except grpc.RpcError as e:
        print(f"{e.code().name}: {_printable(e.details() or '')}", file=sys.stderr)  # the server's text
        return 1
    except BrokenPipeError:
        return 141  # our reader went away, as with any Unix tool writing to a closed pipe
    except KeyboardInterrupt:
        return 130


def serve(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    _raise_fd_limit()
    check_tls_files(args.cert, args.key, args.ca)
    _check_address(args.addr)
    data_dir = DataDirectory(args.data_dir)  # opened again if the server runs again in a scope (its descriptors close)
    into_a_delegated_scope(args.isolation, args.cgroup)  # on a systemd host, may run the server again in a scope
    try:
        policy = LimitPolicy(dict(args.defaults), dict(args.maxima))
    except ValueError as e:
        raise SystemExit(f"jobworker: {e}") from None
    sandbox = Sandbox(args.isolation, args.run_as, args.cgroup, args.io_device, args.data_dir, args.uid_range)
    policy.available = sandbox.controllers
    policy.unavailable = sandbox.unavailable
    # Blocked before any thread starts, so that every thread inherits the mask and only sigwait() below takes them: a
    # Python handler would run only when the main thread next runs bytecode, and it may be waiting on a lock.
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    try:
        server = Server(args.addr, args.cert, args.key, args.ca, data_dir, sandbox, policy,
                        retention=Retention(args.keep_jobs, args.keep_for), max_output=args.max_output,
                        min_free=args.min_free, max_running=args.max_running_per_caller)
    except BaseException:
        if sandbox.cgroups:  # this server's own directories, whatever failed
            sandbox.cgroups.close()
        raise
    logging.info("jobworker %s serving on %s (data in %s)", VERSION, args.addr, args.data_dir)
    print(f"listening on port {server.port}", flush=True)
    notify_systemd("READY=1")
    sig = signal.sigwait(SHUTDOWN_SIGNALS)
    logging.info("%s: stopping every job", signal.Signals(sig).name)
    notify_systemd("STOPPING=1")
    server.shutdown()
    logging.info("stopped")
    return 0


def _raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # each running job holds a few descriptors


def notify_systemd(state):
    """Tells systemd how the service is (sd_notify: READY=1 once it serves, STOPPING=1 as it shuts down), when it runs
    the server as a Type=notify service: a datagram to the socket it names, which may be abstract ('@')."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.sendto(state.encode(), "\0" + address[1:] if address.startswith("@") else address)
    except OSError as e:
        logging.error("cannot tell systemd %s: %s", state, e)


def _check_address(addr):
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SystemExit(f"jobworker: {addr!r} is not HOST:PORT with a port from 0 to 65535")


def run_client(args):
    for path in (args.cert, args.key, args.ca):
        if not os.path.exists(path):
            raise SystemExit(f"jobworker: {path} does not exist (run `make cert`, or pass --cert/--key/--ca)")
    client = Client(args.addr, args.cert, args.key, args.ca)
    try:
        return args.run(client, args)
    finally:
        client.close()


def cli_start(client, args):
    print(_printable(_start(client, args)))
    return 0


def _start(client, args):
    """Starts the job that start's and run's flags describe; returns its id."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:  # a mistake on the command line, told as the parser tells one
        print(f"jobworker: {args.action}: a command is needed: {args.action} [OPTIONS] -- CMD [ARG...]",
              file=sys.stderr)
        raise SystemExit(2)
    return client.start(command, env=dict(args.env), working_directory=args.workdir,
                        **{field: getattr(args, field) for field, *_ in LIMIT_OPTIONS.values()})


def cli_run(client, args):
    """Starts a job, writes its output as it comes and exits with its status, as `ssh host cmd` does."""
    if args.detach:
        return cli_start(client, args)
    with StopOnInterrupt(client) as interrupts:  # before the Start, so that no Ctrl-C goes unanswered
        job_id = _start(client, args)
        interrupts.started(job_id)
        try:
            return _write_output(client.stream(job_id))
        except BrokenPipeError:  # our reader has gone, and nobody will see the job's output: it ends
            client.stop(job_id)
            return 141


class StopOnInterrupt:
    """run's answer to SIGINT (Ctrl-C) and SIGTERM: the first asks the server to stop the job (SIGTERM, then SIGKILL
    after the grace period), the second to kill it at once, the third leaves at once (130), the job as it is. A Stop
    runs in a thread of its own, so that the output keeps coming until the job has ended."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    SAID = {1: b"jobworker: stopping the job (again to kill it)\n",
            2: b"jobworker: killing the job (again to leave without waiting)\n"}

    def __init__(self, client):
        self.client, self.job_id, self.caught, self._stops = client, None, 0, []

    def __enter__(self):
        self._previous = [signal.signal(sig, self._catch) for sig in self.SIGNALS]
        return self

    def __exit__(self, kind, *_):
        for sig, previous in zip(self.SIGNALS, self._previous):
            signal.signal(sig, previous)
        if kind is not KeyboardInterrupt:  # once the job has ended its Stops return; one who leaves does not wait
            for stop in self._stops:
                stop.join()

    def started(self, job_id):
        self.job_id = job_id
        if self.caught:  # during the Start (if one comes in between too, the job is asked twice: no harm)
            self._stop(force=self.caught > 1)

    def _catch(self, sig, frame):
        self.caught += 1
        if self.caught > 2:
            raise KeyboardInterrupt
        if os.isatty(2):  # for whoever pressed Ctrl-C; a script's stderr gets the job's alone
            os.write(2, self.SAID[self.caught])
        if self.job_id:
            self._stop(force=self.caught > 1)

    def _stop(self, force):
        self._stops.append(threading.Thread(target=self._send_stop, args=(force,), name="stop", daemon=True))
        self._stops[-1].start()

    def _send_stop(self, force):
        try:
            self.client.stop(self.job_id, force=force)
        except grpc.RpcError as e:  # the stream goes on; another Ctrl-C tries again
            if e.code() != grpc.StatusCode.CANCELLED:
                os.write(2, f"jobworker: cannot stop the job: {e.code().name}: {_printable(e.details() or '')}\n"
                         .encode())


def cli_status(client, args):
    """query and stop: the job's status, as a row of list's table or as JSON."""
    status = client.query(args.job_id) if args.action == "query" else \
        client.stop(args.job_id, force=args.force, timeout=args.timeout)
    print(to_json(status) if args.json else "\n".join(table([status])))
    return 0


def cli_wait(client, args):
    status = client.wait(args.job_id)
    if args.json:
        print(to_json(status))
    return exit_status(status)


def cli_stream(client, args):
    """The job's output from an offset, or its last SIZE bytes (--tail), then what comes (or not: --no-follow)."""
    offset, end = args.offset, None
    if args.tail is not None or not args.follow:
        status = client.query(args.job_id)  # the output may grow before the Stream begins: it then starts earlier
        if args.tail is not None:
            offset = max(0, status.output_bytes - args.tail)
        if not args.follow and status.state == pb.JobState.Value("RUNNING"):
            end = status.output_bytes  # what is there now (an ended job's stream ends with its status anyway)
            if offset >= end:
                return 0
    return _write_output(client.stream(args.job_id, offset), end)


def _write_output(messages, end=None):
    """Writes a job's output, its stdout to ours and its stderr to ours; returns the job's exit status once it has
    ended, or 0 when the output reaches `end`."""
    outputs = {pb.StreamResponse.STDOUT: sys.stdout.fileno(), pb.StreamResponse.STDERR: sys.stderr.fileno()}
    for message in messages:
        data = message.data if end is None else message.data[:end - message.offset]
        if data:
            _write_all(outputs[message.source], data)
        if message.HasField("status"):
            if message.status.output_dropped_bytes:
                print(f"jobworker: {message.status.output_dropped_bytes} bytes more of the job's output were dropped "
                      "(past the server's --max-output, or on a full disk)", file=sys.stderr)
            return exit_status(message.status)
        if end is not None and message.offset + len(data) >= end:
            return 0
    raise SystemExit("jobworker: the stream ended without the job's status")


def cli_list(client, args):
    state = pb.JobState.Value(args.state) if args.state else None
    jobs = client.list(args.limit + 1 if args.limit else None, state, args.owner)  # one more: are there more?
    shown = jobs[:args.limit] if args.limit else jobs
    print(to_json(pb.ListResponse(jobs=shown)) if args.json else "\n".join(table(shown)))
    if len(shown) < len(jobs):
        print(f"jobworker: the newest {args.limit} shown; --limit N for more (0: all)", file=sys.stderr)
    return 0


def cli_remove(client, args):
    client.remove(args.job_id)
    return 0


def _number(kind, low, high):
    """An argparse type: a `kind` (int, float or parse_size) from low to high, refused with one line otherwise."""
    def parse(text):
        try:
            value = kind(text)
            in_range = math.isfinite(value) and low <= value <= high
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not in_range:
            raise argparse.ArgumentTypeError(f"{text} is not from {low} to {high}")
        return value
    return parse


# flag -> (the Limits field, its type, metavar, help)
LIMIT_OPTIONS = {
    "cpu": ("cpu_cores", _number(float, 0, 1 << 20), "CORES", "CPU, in cores (0.5: half of one)"),
    "memory": ("memory_bytes", _number(parse_size, 0, UINT64_MAX), "SIZE", "memory, e.g. 512M (no swap)"),
    "io-read-bps": ("io_read_bps", _number(parse_size, 0, UINT64_MAX), "SIZE", "disk reads per second, e.g. 10M"),
    "io-write-bps": ("io_write_bps", _number(parse_size, 0, UINT64_MAX), "SIZE", "disk writes per second"),
    "pids": ("pids", _number(int, 0, UINT64_MAX), "COUNT", "processes and threads at once"),
}


def _variable(text):
    """KEY=VALUE of -e: (KEY, VALUE); KEY alone takes its value from our own environment, as `docker run -e` does."""
    key, equals, value = text.partition("=")
    if not equals:
        if key not in os.environ:
            raise argparse.ArgumentTypeError(f"{text!r} is neither KEY=VALUE nor a variable set here")
        value = os.environ[key]
    return key, value


def _id_range(text):
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit()):
        raise argparse.ArgumentTypeError(f"not a range of ids: {text!r} (use FIRST-LAST)")
    return int(first), int(last)


def _duration(text):
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _min_free(text):
    """serve's --min-free: a size, or a share of the file system ('2%')."""
    try:
        if text.endswith("%") and 0 <= float(text[:-1]) < 100:
            return text
        parse_size(text)
        return text
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size or a percentage under 100: {text!r}") from None


def _limit_option(text):
    """LIMIT=VALUE of serve's --default and --max: (the Limits field, the value)."""
    name, _, value = text.partition("=")
    if name not in LIMIT_OPTIONS:
        raise argparse.ArgumentTypeError(f"unknown limit {name!r} (one of {', '.join(LIMIT_OPTIONS)})")
    field, parse, *_ = LIMIT_OPTIONS[name]
    return field, parse(value)


def _client_command(commands, name, run, summary):
    parser = commands.add_parser(name, help=summary, description=summary)
    env = os.environ.get
    parser.add_argument("--addr", default=env("JOBWORKER_ADDR", "127.0.0.1:7777"),
                        help="the server's HOST:PORT (JOBWORKER_ADDR)")
    parser.add_argument("--cert", default=env("JOBWORKER_CERT", os.path.join(CERTS, "admin.pem")),
                        help="your certificate (JOBWORKER_CERT)")
    parser.add_argument("--key", default=env("JOBWORKER_KEY", os.path.join(CERTS, "admin.key")),
                        help="its private key (JOBWORKER_KEY)")
    parser.add_argument("--ca", default=env("JOBWORKER_CA", os.path.join(CERTS, "ca.pem")),
                        help="the CA that signs the server's certificate (JOBWORKER_CA)")
    parser.set_defaults(run=run)
    return parser


def build_parser():
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, as for every other error
            self.exit(2, f"jobworker: {self.prog.split()[-1]}: {message}\n")

    parser = Parser(prog="jobworker.py", description="Run Linux commands for remote clients, safely.")
    parser.add_argument("--version", action="version", version=f"jobworker {VERSION}", help="say which version this is")
    commands = parser.add_subparsers(dest="action", required=True,
                                     metavar="{serve,run,start,stop,query,stream,wait,list,remove}")

    serve_ = commands.add_parser("serve", help="run the service")
    serve_.add_argument("--addr", default="127.0.0.1:7777", help="HOST:PORT to listen on (port 0: any free one)")
    serve_.add_argument("--cert", default=os.path.join(CERTS, "server.pem"), help="the server's certificate")
    serve_.add_argument("--key", default=os.path.join(CERTS, "server.key"), help="its private key")
    serve_.add_argument("--ca", default=os.path.join(CERTS, "ca.pem"), help="the CA that signs client certificates")
    serve_.add_argument("--data-dir", default=os.path.join(HERE, "data"), help="where job output and the audit go")
    serve_.add_argument("--isolation", choices=("on", "off", "auto"), default="auto",
                        help="on: refuse to run without every isolation; auto: whatever the host offers")
    serve_.add_argument("--run-as", metavar="USER",
                        help="one user every job runs as (default: each job a transient user of its own, when root)")
    serve_.add_argument("--uid-range", type=_id_range, default=TRANSIENT_IDS, metavar="FIRST-LAST",
                        help=f"the uids (and gids) of transient users, which no account may have "
                             f"(default {TRANSIENT_IDS[0]}-{TRANSIENT_IDS[1]})")
    serve_.add_argument("--cgroup", choices=("auto", "v1", "v2"), default="auto", help="which cgroup hierarchy")
    serve_.add_argument("--io-device", metavar="MAJ:MIN", help="the disk of disk limits (default: the data dir's)")
    for flag, dest, summary in (("--default", "defaults", "a limit for jobs that ask for none"),
                                ("--max", "maxima", "the most a job may ask for")):
        serve_.add_argument(flag, dest=dest, action="append", type=_limit_option, default=[], metavar="LIMIT=VALUE",
                            help=f"{summary}; LIMIT is one of {', '.join(LIMIT_OPTIONS)} (repeatable)")
    serve_.add_argument("--keep-jobs", type=_number(int, 0, 1 << 31), default=DEFAULT_KEEP_JOBS, metavar="N",
                        help=f"ended jobs kept with their output, the oldest removed first "
                             f"(default {DEFAULT_KEEP_JOBS})")
    serve_.add_argument("--keep-for", type=_duration, default=DEFAULT_KEEP_FOR, metavar="DURATION",
                        help="how long an ended job is kept, e.g. 36h (s, m, h, d; default 7d)")
    serve_.add_argument("--max-output", type=_number(parse_size, 0, UINT64_MAX), default=DEFAULT_MAX_OUTPUT,
                        metavar="SIZE", help="output kept per job; the rest is dropped and counted (default 1G)")
    serve_.add_argument("--min-free", type=_min_free, default=DEFAULT_MIN_FREE, metavar="SIZE|N%",
                        help=f"free space in the data directory under which Starts are refused "
                             f"(default {DEFAULT_MIN_FREE})".replace("%", "%%"))  # argparse formats help with %
    serve_.add_argument("--max-running-per-caller", type=_number(int, 1, 1 << 31), default=DEFAULT_MAX_RUNNING,
                        metavar="N", help=f"jobs a caller may have running at once; admins are not held to it "
                                          f"(default {DEFAULT_MAX_RUNNING})")

    run = _client_command(commands, "run", cli_run, "start a job, write its output and exit with its status; "
                          "Ctrl-C stops it, a second Ctrl-C kills it")
    run.add_argument("--detach", action="store_true", help="only start it and print its id, as start does")
    start = _client_command(commands, "start", cli_start, "start a job and print its id")
    for subcommand in (run, start):
        for flag, (field, parse, metavar, summary) in LIMIT_OPTIONS.items():
            subcommand.add_argument(f"--{flag}", dest=field, type=parse, default=0, metavar=metavar, help=summary)
        subcommand.add_argument("-e", "--env", action="append", type=_variable, default=[], metavar="KEY=VALUE",
                                help="a variable for the job, on top of PATH, HOME, USER, LOGNAME, SHELL and LANG; "
                                     "KEY alone passes the value it has here (repeatable)")
        subcommand.add_argument("--workdir", default="", metavar="DIR",
                                help="the directory it starts in, on the server (default /)")
        subcommand.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                                help="the command to run")

    stop = _client_command(commands, "stop", cli_status, "stop a job, and show how it ended")
    stop.add_argument("--force", action="store_true", help="SIGKILL at once")
    stop.add_argument("--timeout", type=_number(float, 0, MAX_STOP_GRACE), metavar="SECONDS",
                      help=f"grace period between SIGTERM and SIGKILL (default {DEFAULT_STOP_GRACE:g})")
    query = _client_command(commands, "query", cli_status, "show a job's status")
    for subcommand in (stop, query):
        subcommand.add_argument("--json", action="store_true", help="as JSON")
        subcommand.add_argument("job_id", metavar="JOB_ID", help="the job")

    stream = _client_command(commands, "stream", cli_stream, "write a job's output, then exit with its status")
    where = stream.add_mutually_exclusive_group()
    where.add_argument("--offset", type=_number(int, 0, UINT64_MAX), default=0, metavar="N",
                       help="start at this byte of the output")
    where.add_argument("--tail", type=_number(parse_size, 0, UINT64_MAX), metavar="SIZE",
                       help="start SIZE bytes before the end of the output so far, e.g. 4K")
    stream.add_argument("--no-follow", dest="follow", action="store_false",
                        help="write what there is now, then exit: 0 if the job still runs, else its status")
    stream.add_argument("job_id", metavar="JOB_ID", help="the job")

    wait = _client_command(commands, "wait", cli_wait, "wait until a job has ended, then exit with its status")
    wait.add_argument("--json", action="store_true", help="print its final status as JSON")
    wait.add_argument("job_id", metavar="JOB_ID", help="the job")

    listing = _client_command(commands, "list", cli_list, "list the jobs you may see, newest first")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.add_argument("--limit", type=_number(int, 0, 1 << 31), default=50, metavar="N",
                         help="the newest N jobs (default 50; 0: all)")
    states = [name for name in pb.JobState.keys() if name != "JOB_STATE_UNSPECIFIED"]
    listing.add_argument("--state", type=str.upper, choices=states, help="only jobs in this state")
    listing.add_argument("--owner", metavar="SUBJECT", help="only this owner's jobs: the whole subject of its "
                         "certificate, as list shows it (O=jobworker,OU=user,CN=alice)")

    remove = _client_command(commands, "remove", cli_remove, "remove an ended job and its output")
    remove.add_argument("job_id", metavar="JOB_ID", help="the job")
    return parser


if __name__ == "__main__":
    sys.exit(main())
