"""A real two-node SLURM cluster on this machine, for the launch tests (no mocks).

``slurm_cluster`` (session fixture) installs Debian's SLURM when it is missing
(tools/install_slurm.sh), then starts a private munged, one slurmctld and two slurmd daemons
(``n1``, ``n2``, both at 127.0.0.1) from a generated ``slurm.conf`` in a temp dir. Every daemon
is started here in the foreground, so the PID we hold is the daemon's own; teardown stops exactly
those PIDs (SIGTERM, then SIGKILL), in a ``finally`` and from ``atexit``, never by name.

The config suits a container without systemd or cgroups: proctrack/linuxproc and task/none (no cgroups
here), select/cons_tres, a ``%n``-templated spool/pid/log per slurmd and a job completion log
(jobcomp/filetxt) so a test can see how a job ended without slurmdbd. A TaskProlog gives each
emulated node its own TMPDIR and a mount namespace its own /dev/shm, as real nodes have.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "munged")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block(n: int, start: int = 17001, stop: int = 17900) -> int:
    """First port p in [start, stop) with p .. p+n-1 all free (slurmd ports must be a range)."""
    for base in range(start, stop, n):
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports in [{start}, {stop})")


def ensure_slurm_installed() -> None:
    """Install slurm-wlm + munge with tools/install_slurm.sh when any binary is missing."""
    if all(shutil.which(b) for b in SLURM_BINARIES):
        return
    proc = subprocess.run(["bash", str(REPO / "tools" / "install_slurm.sh")], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 or not all(shutil.which(b) for b in SLURM_BINARIES):
        raise RuntimeError(f"tools/install_slurm.sh failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@dataclass
class JobInfo:
    """A few fields of ``scontrol show job`` (-o, key=value)."""

    job_id: int
    state: str
    restarts: int
    exit_code: str
    reason: str
    raw: dict = field(repr=False, default_factory=dict)


@dataclass
class SlurmCluster:
    """Handle on the running cluster: its files, env and a few client helpers."""

    root: Path
    conf: Path
    jobcomp: Path
    env: dict
    pids: list = field(default_factory=list)
    procs: list = field(default_factory=list)

    # ---- client helpers ------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: int) -> JobInfo | None:
        """The job's current record, or None once the controller forgot it."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            return None
        raw = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        return JobInfo(int(raw["JobId"]), raw.get("JobState", ""), int(raw.get("Restarts", "0")),
                       raw.get("ExitCode", ""), raw.get("Reason", ""), raw)

    def jobcomp_records(self, job_id: int) -> list[dict]:
        """The job completion log's lines for ``job_id`` (one per run that ended), as dicts."""
        if not self.jobcomp.exists():
            return []
        out = []
        for line in self.jobcomp.read_text().splitlines():
            rec = dict(re.findall(r"(\w+)=(\S*)", line))
            if rec.get("JobId") == str(job_id):
                out.append(rec)
        return out

    def wait_until_done(self, job_id: int, timeout: float, *, kick_requeued: bool = True) -> list[dict]:
        """Wait until the job has ended for good; return its completion-log records.

        A requeued job is held ~120 s by SLURM before it may start again; ``kick_requeued``
        releases it at once (``scontrol update StartTime=now``) so a test does not wait out the delay.
        """
        deadline = time.monotonic() + timeout
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        pending_since = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info is None:
                break
            if info.state in final:
                return self.jobcomp_records(job_id)
            held = info.state == "PENDING" and info.restarts > 0 and info.reason == "BeginTime"
            pending_since = (pending_since or time.monotonic()) if held else None
            # slurmd refuses to relaunch a job whose credential was revoked in the same second
            # ("Job credential revoked"): let the requeue settle for a few seconds first.
            if kick_requeued and held and time.monotonic() - pending_since > 3.0:
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
                pending_since = None
            time.sleep(0.5)
        else:
            info = self.job(job_id)
            self.run("scancel", str(job_id), check=False)
            raise TimeoutError(f"job {job_id} not done after {timeout} s: {info}")
        return self.jobcomp_records(job_id)

    # ---- lifecycle -----------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every daemon this fixture started, by PID: TERM, wait, then KILL."""
        # cancel jobs first so slurmd does not leave job processes behind
        if self.procs and self.procs[0].poll() is None and shutil.which("scancel"):
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=30)
            # job processes belong to slurmstepd, not slurmd: let them end before the daemons go
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                                   text=True, timeout=30)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        if not os.environ.get("MIRAS_KEEP_SLURM_DIR"):
            shutil.rmtree(self.root, ignore_errors=True)


def _write_conf(root: Path, ctld_port: int, node_port: int, munge_socket: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    # Real nodes each have their own /tmp. The emulated ones share this machine's, so give every
    # task its node's own TMPDIR (a TaskProlog's "export" lines enter the task environment);
    # otherwise node-local caches and locks (the data loader's) would be shared across "nodes".
    prolog = root / "task_prolog.sh"
    prolog.write_text(f"""#!/bin/sh
d={root}/nodetmp/$SLURMD_NODENAME
mkdir -p "$d"
echo "export TMPDIR=$d"
""")
    prolog.chmod(0o755)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=miras-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
MessageTimeout=20
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
TaskProlog={root}/task_prolog.sh
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_port}-{node_port + 1}] CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_cluster() -> SlurmCluster:
    """Start munged, slurmctld and slurmd n1, n2; return once both nodes are idle."""
    ensure_slurm_installed()
    root = Path(tempfile.mkdtemp(prefix="miras-slurm-"))
    os.chmod(root, 0o755)  # the munge user must reach its own subdirectory
    for sub in ("state", "spool", "jobs"):
        (root / sub).mkdir()
    env = dict(os.environ)
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", jobcomp=root / "jobcomp.txt", env=env)
    atexit.register(cluster.stop)
    try:
        # --- munge: a private instance with its own key and socket (never the system one) ---
        mdir = root / "munge"
        mdir.mkdir(mode=0o700)
        key = mdir / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        # key, seed and log private to munge; the socket's directory must be world-executable
        sdir = root / "munge-socket"
        sdir.mkdir(mode=0o755)
        for path in (mdir, key, sdir):
            shutil.chown(path, "munge", "munge")
        os.chmod(key, 0o600)
        sock = sdir / "munge.socket"
        munged = subprocess.Popen(
            ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "munged", "--foreground",
             f"--socket={sock}", f"--key-file={key}", f"--log-file={mdir / 'munged.log'}",
             f"--pid-file={mdir / 'munged.pid'}", f"--seed-file={mdir / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=_errfile(root, "munged"))
        cluster.procs.append(munged)
        _wait_for(lambda: sock.exists(), 15, "munged socket", munged)

        ctld_port = _free_port_block(1, 16817, 16900)
        node_port = _free_port_block(2)
        conf = _write_conf(root, ctld_port, node_port, sock)
        env["SLURM_CONF"] = str(conf)
        # A job's clients (scontrol requeue in the batch script) reach the controller through
        # SLURM_CONF, which sbatch exports to the job by default.
        ctld = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                                stdout=subprocess.DEVNULL, stderr=_errfile(root, "slurmctld"))
        cluster.procs.append(ctld)
        _wait_for(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, 30, "slurmctld", ctld)
        for node in ("n1", "n2"):
            # Real nodes have their own /dev/shm, where mosaicml-streaming keeps per-node state
            # keyed by a small integer prefix: give each emulated node a private one (a mount
            # namespace with its own tmpfs, inherited by every job process slurmd starts).
            # unshare and sh exec, so the PID we hold is slurmd's.
            d = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  'mount -t tmpfs -o size=4g,mode=1777 tmpfs /dev/shm && exec "$@"',
                                  "node-shm", "slurmd", "-D", "-N", node, "-f", str(conf)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=_errfile(root, f"slurmd-{node}"))
            cluster.procs.append(d)

        def nodes_idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            return out.count("idle") == 2

        _wait_for(nodes_idle, 60, "two idle slurmd nodes", *cluster.procs[2:])
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _errfile(root: Path, name: str):
    # a file, not a pipe: a daemon that writes much to stderr must never block on a full pipe
    return open(root / f"{name}.stderr", "wb")


def _wait_for(pred, timeout: float, what: str, *procs: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: daemon {' '.join(map(str, p.args[:5]))} exited with "
                                   f"{p.returncode}; see the *.stderr and *.log files in its temp dir")
        if pred():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running two-node cluster; every daemon is stopped by PID at the end of the session."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
