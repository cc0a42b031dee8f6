"""Tests of jobworker where a real host puts it: under systemd (PID 1) on a cgroup v2 kernel, as the service
`make install-service` installs, and as `make serve` started by hand from a login session.

They install, start, kill and stop a system service, so they run only where JOBWORKER_TEST_SYSTEMD=1 says the
machine is a throwaway one: `make test-cgroup2` runs them in a virtual machine booted with systemd
(../shared/tools/cgroup2-vm --systemd), from a root login session there. They use this checkout's certificates.
"""

import contextlib
import os
import random
import re
import select
import signal
import ssl
import socket
import subprocess
import time

import pytest

import jobworker

HERE = os.path.dirname(os.path.abspath(__file__))
CERTS = os.path.join(HERE, "certs")
MiB = 1 << 20
UNIT = "jobworker.service"
UNIT_CGROUP = "/sys/fs/cgroup/system.slice/jobworker.service"
EVERY_LIMIT = {"cpu_cores": 0.5, "memory_bytes": 64 * MiB, "io_read_bps": MiB, "io_write_bps": 2 * MiB, "pids": 32}

pytestmark = pytest.mark.skipif(
    os.environ.get("JOBWORKER_TEST_SYSTEMD") != "1" or os.geteuid() != 0 or not jobworker.on_systemd(),
    reason="installs and starts a system service: only as root, under systemd, with JOBWORKER_TEST_SYSTEMD=1 "
           "(make test-cgroup2 runs them in a throwaway virtual machine)")


def run(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check, cwd=HERE, timeout=300)


def show(unit, *properties):
    """The unit's properties, as systemctl show gives them."""
    lines = run("systemctl", "show", unit, *(f"--property={name}" for name in properties)).stdout.splitlines()
    return dict(line.split("=", 1) for line in lines)


def wait_until(condition, timeout=120, interval=0.02):
    """Polls `condition` until it holds or `timeout` seconds have passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def client(port=7777):
    return jobworker.Client(f"127.0.0.1:{port}", *(os.path.join(CERTS, name) for name in ("admin.pem", "admin.key",
                                                                                        "ca.pem")))


def marker():
    return str(random.randint(10 ** 8, 10 ** 9))


def processes_with(label):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if label.encode() in f.read():
                pids.append(int(pid))
    return pids


def cgroup_of(pid):
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def read(path):
    with open(path) as f:
        return f.read().strip()


def start_with_every_limit(jobs, label):
    """Starts `sleep LABEL` with every limit; checks that its status says each applies, and that its cgroup holds each
    (read from the kernel's files); returns the job's id and its cgroup's directory."""
    job_id = jobs.start(["sleep", label], **EVERY_LIMIT)
    status = jobs.query(job_id)
    assert status.isolation.cgroup == "v2"
    assert set(status.isolation.namespaces) == {"pid", "mount", "network", "ipc", "cgroup"}
    assert {name: getattr(status.isolation.limits, name) for name in EVERY_LIMIT} == EVERY_LIMIT, status
    group = "/sys/fs/cgroup" + cgroup_of(status.pid)
    assert os.path.basename(group) == job_id
    disk = jobworker.block_device_of("/mnt/data")
    assert read(f"{group}/cpu.max") == "50000 100000" and read(f"{group}/memory.max") == str(64 * MiB)
    assert read(f"{group}/memory.swap.max") == "0" and read(f"{group}/pids.max") == "33"
    assert read(f"{group}/memory.oom.group") == "1"
    assert read(f"{group}/io.max") == f"{disk} rbps={MiB} wbps={2 * MiB} riops=max wiops=max"
    return job_id, group


def served_certificate(port=7777):
    """The certificate the server presents (DER), over a TLS connection with a client certificate."""
    context = ssl.create_default_context(cafile=os.path.join(CERTS, "ca.pem"))
    context.load_cert_chain(os.path.join(CERTS, "admin.pem"), os.path.join(CERTS, "admin.key"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.getpeercert(binary_form=True)


def pem_to_der(path):
    return ssl.PEM_cert_to_DER_cert(read(path) + "\n")


@pytest.fixture(scope="module")
def service():
    """jobworker.service as `make install-service` installs it. Its state directory is on the VM's disk, where a
    host's /var/lib is (the VM's own root is a tmpfs overlay, under which no disk limit could apply)."""
    os.makedirs("/mnt/data/state", exist_ok=True)
    os.makedirs("/var/lib/jobworker", exist_ok=True)
    run("mount", "--bind", "/mnt/data/state", "/var/lib/jobworker")
    installed = run("make", "install-service", check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    unit = read(f"/etc/systemd/system/{UNIT}")
    assert f"ExecStart={HERE}/.venv/bin/python {HERE}/jobworker.py serve" in unit and "@HERE@" not in unit
    assert sorted(os.listdir("/etc/jobworker")) == ["ca.pem", "server.key", "server.pem"]
    assert show(UNIT, "LoadState")["LoadState"] == "loaded"  # systemd has read it: the target reloaded it
    yield
    run("systemctl", "stop", UNIT, check=False)
    run("systemctl", "disable", UNIT, check=False)
    os.unlink(f"/etc/systemd/system/{UNIT}")
    run("systemctl", "daemon-reload")
    run("umount", "/var/lib/jobworker")


def test_the_service_is_active_only_once_it_serves_and_runs_a_job_with_every_limit(service):
    """Type=notify: the unit stays "activating" until the server has said READY=1, once it listens; from the moment
    it is active, a call succeeds. A job gets every limit, in a cgroup of its own under the delegated service's."""
    run("systemctl", "enable", UNIT)
    run("systemctl", "start", "--no-block", UNIT)
    seen = []

    def settled():
        state = show(UNIT, "ActiveState", "SubState")
        seen.append((state["ActiveState"], state["SubState"]))
        return state["ActiveState"] in ("active", "failed")
    assert wait_until(settled), seen[-1]
    assert seen[-1] == ("active", "running"), seen[-1]
    jobs = client()
    try:
        assert jobs.stub.List(jobworker.pb.ListRequest(), timeout=10).jobs == []  # at once: it was listening
        assert ("activating", "start") in seen, "never saw the unit wait for the server to be ready"
        unit = show(UNIT, "Type", "Delegate", "MainPID", "ControlGroup", "UnitFileState")
        assert (unit["Type"], unit["Delegate"], unit["UnitFileState"]) == ("notify", "yes", "enabled")
        assert cgroup_of(unit["MainPID"]) == unit["ControlGroup"] + "/supervisor"
        label = marker()
        job_id, group = start_with_every_limit(jobs, label)
        assert group.startswith(f"{UNIT_CGROUP}/jobworker-{unit['MainPID']}-")
        assert jobs.stop(job_id, force=True).state == jobworker.pb.STOPPED
        assert processes_with(label) == []
    finally:
        jobs.close()


def test_systemctl_stop_lets_the_server_end_its_jobs_and_leaves_no_process_or_cgroup(service):
    """KillMode=mixed: SIGTERM to the server alone, which stops every job itself (one that ignores SIGTERM is killed
    after the grace) and exits cleanly; then nothing of the service, its jobs or their cgroups is left."""
    run("systemctl", "start", UNIT)
    label = marker()
    jobs = client()
    try:
        jobs.start(["sleep", label])
        stubborn = jobs.start(["sh", "-c", f"trap '' TERM; sleep {label} & echo ready; wait"])
        for message in jobs.stream(stubborn):  # the trap is set
            break
        main = int(show(UNIT, "MainPID")["MainPID"])
        assert len(processes_with(label)) == 3  # the two sleeps, and the shell whose command names one
    finally:
        jobs.close()
    run("systemctl", "stop", UNIT)
    unit = show(UNIT, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert (unit["ActiveState"], unit["Result"], unit["ExecMainStatus"]) == ("inactive", "success", "0"), unit
    assert processes_with(label) == [] and not os.path.exists(f"/proc/{main}")
    assert not os.path.exists(UNIT_CGROUP), os.listdir(UNIT_CGROUP)
    journal = lambda: run("journalctl", "--unit", UNIT, f"_PID={main}", "--output=cat").stdout
    assert wait_until(lambda: journal().rstrip().endswith(" INFO stopped"), timeout=30), journal()[-2000:]
    assert " INFO SIGTERM: stopping every job" in journal()


def test_a_service_killed_outright_is_restarted_by_systemd_and_its_jobs_die_with_it(service):
    run("systemctl", "start", UNIT)
    before = show(UNIT, "MainPID", "NRestarts")
    label = marker()
    jobs = client()
    try:
        jobs.start(["sleep", label])
    finally:
        jobs.close()
    os.kill(int(before["MainPID"]), signal.SIGKILL)

    def restarted():
        now = show(UNIT, "MainPID", "NRestarts", "ActiveState", "SubState")
        return now["MainPID"] not in ("0", before["MainPID"]) and (now["ActiveState"], now["SubState"]) == \
            ("active", "running") and now

    now = wait_until(restarted)
    assert now and int(now["NRestarts"]) == int(before["NRestarts"]) + 1, show(UNIT, "MainPID", "NRestarts")
    assert processes_with(label) == []
    jobs = client()
    try:
        # A new server, which serves, and knows the killed server's job as LOST.
        lost = [status.state for status in jobs.list() if list(status.command) == ["sleep", label]]
        assert lost == [jobworker.pb.LOST]
    finally:
        jobs.close()
    assert [entry for entry in os.listdir(UNIT_CGROUP) if entry.startswith("jobworker-")] == \
        [f"jobworker-{now['MainPID']}-{os.stat('/proc/self/ns/pid').st_ino}"]


def test_the_services_certificate_is_renewed_as_the_readme_says(service):
    """`rm certs/server.pem && make cert`, then install it and restart: the service presents the new certificate,
    from the same key and CA, and clients go on connecting."""
    run("systemctl", "start", UNIT)
    assert served_certificate() == pem_to_der("/etc/jobworker/server.pem")
    old = pem_to_der(os.path.join(CERTS, "server.pem"))
    run("sh", "-c", "rm certs/server.pem && make cert")
    run("install", "-m", "600", os.path.join(CERTS, "server.pem"), "/etc/jobworker/")
    run("systemctl", "restart", UNIT)
    new = pem_to_der("/etc/jobworker/server.pem")
    assert new != old and served_certificate() == new
    jobs = client()
    try:
        job_id = jobs.start(["true"])
        assert jobs.query(job_id).job_id == job_id
    finally:
        jobs.close()


def test_make_serve_from_a_login_session_asks_systemd_for_a_delegated_scope_and_applies_every_limit():
    """By hand, the server starts in the login session's scope, which holds the shell too: it runs itself again in a
    transient scope of its own with Delegate=yes, writes nothing in the session's cgroup, and applies every limit.
    Stopped, it leaves neither the scope nor any process."""
    session = cgroup_of(os.getpid())
    assert re.fullmatch(r"/user\.slice/user-0\.slice/session-\d+\.scope", session), session
    before = sorted(os.listdir("/sys/fs/cgroup" + session))
    port = 7788
    serving = subprocess.Popen(["make", "serve", f"ARGS=--addr 127.0.0.1:{port} --data-dir /mnt/data/by-hand"],
                               cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith(b"listening on port")):
            assert select.select([serving.stdout], [], [], 120)[0], f"no 'listening' from make serve: {lines}"
            lines.append(serving.stdout.readline())
            assert lines[-1], f"make serve ended: {lines} {serving.stderr.read().decode()}"
        (server,) = [pid for pid in processes_with(f"127.0.0.1:{port}") if pid in processes_with("jobworker.py\0serve")]
        scope = f"jobworker-{server}.scope"
        assert cgroup_of(server) == f"/system.slice/{scope}/supervisor"
        assert show(scope, "Delegate")["Delegate"] == "yes"
        assert sorted(os.listdir("/sys/fs/cgroup" + session)) == before, "the server wrote in the session's cgroup"
        label = marker()
        jobs = client(port)
        try:
            job_id, group = start_with_every_limit(jobs, label)
            assert group.startswith(f"/sys/fs/cgroup/system.slice/{scope}/jobworker-{server}-")
        finally:
            jobs.close()
        pidfd = os.pidfd_open(server)
        os.killpg(serving.pid, signal.SIGTERM)  # as Ctrl-C reaches make and the server
        assert select.select([pidfd], [], [], 60)[0], "the server did not stop"
        os.close(pidfd)
        assert processes_with(label) == []
        assert wait_until(lambda: show(scope, "LoadState")["LoadState"] == "not-found", timeout=30), \
            show(scope, "LoadState", "ActiveState")
        assert not os.path.exists(f"/sys/fs/cgroup/system.slice/{scope}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serving.pid, signal.SIGKILL)
        serving.communicate()
