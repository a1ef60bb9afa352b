"""A real SLURM cluster on this one machine, for tests: Debian's slurmctld and slurmd over loopback.

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch("recipes/slurm/jpeg_tiny.sbatch", env={...}, args=["--trainer.max_steps=6"])
        info = cluster.wait(job, timeout=120)  # scontrol's fields, e.g. info["JobState"] == "COMPLETED"

Everything lives in one directory: slurm.conf, state, spool, logs and pid files. No cgroups (the sandbox
has no cgroup control): processes are tracked through /proc, tasks are not bound, nothing is accounted.
Ports are picked free on 127.0.0.1 so two clusters cannot clash. Two settings make requeueing fast:
``AuthInfo=cred_expire=10`` (a requeued job otherwise waits 121 s for its old credential to expire) and
``sched_interval=2`` (otherwise up to 60 s more before the scheduler looks again).

On exit it cancels its jobs and stops exactly the daemons it started, by the pids in their pid files
(munged too when it started it, unless another SLURM daemon on the machine still uses it). Needs root, as
the daemons do; tests skip when slurm-wlm is not installed (CI installs it, see .ci/run).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DAEMONS = ("slurmctld", "slurmd", "munged")
# A job in one of these states will not run again by itself (a requeued job passes through REQUEUED).
FINISHED = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
MUNGE_RUN_DIR = Path("/run/munge")


def installed() -> bool:
    """True when slurm-wlm and munge are on PATH (``apt-get install slurm-wlm munge``)."""
    return all(_which(name) for name in DAEMONS)


class SlurmCluster:
    """One controller and one compute node (this host, ``cpus`` CPUs) with a single default partition.

    Args:
        root: directory for the config, state, spool, logs and pid files (kept short: it holds sockets).
        cpus: CPUs the node offers.
        start_timeout: seconds allowed for the daemons to come up and run a first ``srun``.
    """

    def __init__(self, root: str | os.PathLike | None = None, cpus: int = 2, start_timeout: float = 60.0) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="slurm-"))
        self.cpus = cpus
        self.start_timeout = start_timeout
        self.node = socket.gethostname().split(".")[0]  # slurmd and slurmctld match the short host name
        self.conf = self.root / "slurm.conf"
        self._started: dict[str, Path] = {}  # daemon -> its pid file, for exactly what this object started
        self._outputs: dict[int, str] = {}  # job id -> output file (scontrol forgets finished jobs)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, scontrol, and jobs through them) needs on top of ``os.environ``."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("SlurmCluster runs slurmctld and slurmd as root (SlurmUser=root): run the tests as root")
        missing = [name for name in DAEMONS if not _which(name)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not found: apt-get install slurm-wlm munge")
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config(*_free_ports(2)))
        self._start_munged()
        daemon_env = {**os.environ, **self.env}
        for name, command in (
            ("slurmctld", [_which("slurmctld"), "-i", "-f", str(self.conf)]),
            ("slurmd", [_which("slurmd"), "-f", str(self.conf), "-N", self.node]),
        ):
            self._started[name] = self.root / f"{name}.pid"
            # Both daemonize: the command returns once the daemon has forked and written its pid file.
            result = subprocess.run(command, env=daemon_env, capture_output=True, text=True, timeout=30)
            if result.returncode:
                raise RuntimeError(f"{name} failed to start ({result.returncode}): {result.stderr}{self.logs()}")
        self.wait_for(
            lambda: self.run("sinfo", "-h", "-t", "idle", "-o", "%D", check=False).stdout.strip() == "1",
            self.start_timeout,
            f"node {self.node} idle in sinfo",
        )
        result = self.run("srun", "-n", str(self.cpus), "true", check=False, timeout=self.start_timeout)
        if result.returncode:
            raise RuntimeError(f"srun -n {self.cpus} true failed: {result.stderr}{self.logs()}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started (and nothing else)."""
        if "slurmctld" in self._started:
            with contextlib.suppress(Exception):
                self._cancel_all()
        for name in DAEMONS:  # the controller first, munged last: the others talk through it
            pid_file = self._started.pop(name, None)
            if pid_file is None:
                continue
            if name == "munged" and _running("slurmctld", "slurmd", "slurmstepd"):
                continue  # munged serves the whole machine: another cluster started meanwhile still needs it
            _stop_daemon(name, pid_file)

    def config(self, controller_port: int, node_port: int) -> str:
        """slurm.conf for one node on loopback, no cgroups, no accounting, quick requeue."""
        r = self.root
        return f"""\
ClusterName=jpeglm-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    # ------------------------------------------------------------------ jobs

    def run(
        self,
        *command: str,
        check: bool = True,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster, with ``os.environ``, :attr:`env` and ``env``.

        Raises with the daemons' logs when it outlives ``timeout`` seconds, or fails and ``check`` is set.
        """
        try:
            result = subprocess.run(
                command,
                env={**os.environ, **self.env, **(env or {})},
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            raise TimeoutError(f"{' '.join(command)} took over {timeout:.0f} s{self.logs()}") from error
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{self.logs()}")
        return result

    def sbatch(
        self,
        script: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        args: Iterable[str] = (),
        options: Iterable[str] = (),
        cwd: str | os.PathLike | None = None,
    ) -> int:
        """Submit ``script`` from ``cwd`` with sbatch ``options`` and script ``args``; returns the job id.

        The job runs with ``os.environ``, this cluster's :attr:`env` and ``env``: sbatch exports the caller's
        environment, and keeps it for a requeued run.
        """
        result = self.run("sbatch", "--parsable", *options, str(script), *args, env=env, cwd=cwd)
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, StdOut, ...); empty once the job is forgotten."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}

    def state(self, job_id: int) -> str:
        """The job's state, e.g. PENDING, RUNNING, REQUEUED, COMPLETED ("" when SLURM does not know it)."""
        return self.job(job_id).get("JobState", "")

    def wait(
        self, job_id: int, timeout: float = 120.0, states: Iterable[str] = FINISHED, interval: float = 0.5
    ) -> dict[str, str]:
        """Poll ``scontrol show job`` until the job's state is one of ``states``; returns its fields.

        Not ``sbatch --wait``: that returns about 30 s after the job ends. Raises ``TimeoutError`` with the
        daemons' logs and the job's output after ``timeout`` seconds.
        """
        wanted = set(states)
        info: dict[str, str] = {}

        def reached() -> bool:
            info.update(self.job(job_id))
            return info.get("JobState") in wanted

        self.wait_for(reached, timeout, f"job {job_id} in {sorted(wanted)}", job_id, interval)
        return info

    def output(self, job_id: int) -> str:
        """The job's output file so far ("" when it has none yet)."""
        path = self._outputs.get(job_id) or self.job(job_id).get("StdOut")
        if path:
            self._outputs[job_id] = path
        try:
            return Path(path).read_text(errors="replace") if path else ""
        except OSError:
            return ""

    def logs(self, job_id: int | None = None, tail: int = 60) -> str:
        """The last lines of slurmctld's and slurmd's logs and of the job's output, for failure messages."""
        parts = []
        for name in ("slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            lines = path.read_text(errors="replace").splitlines()[-tail:] if path.exists() else ["(no log)"]
            parts.append(f"--- {path} (last {tail} lines)\n" + "\n".join(lines))
        if job_id is not None:
            parts.append(f"--- scontrol show job {job_id}\n{self.job(job_id)}")
            lines = self.output(job_id).splitlines()[-3 * tail :]
            parts.append(f"--- job {job_id} output (last {3 * tail} lines)\n" + "\n".join(lines))
        return "\n" + "\n".join(parts)

    def wait_for(
        self, condition: Callable[[], T], timeout: float, what: str, job_id: int | None = None, interval: float = 0.5
    ) -> T:
        """Poll ``condition`` until it returns something true, and return that; ``TimeoutError`` (with the logs
        and ``job_id``'s output) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}{self.logs(job_id)}")
            time.sleep(interval)

    # ------------------------------------------------------------------ internals

    def _cancel_all(self, timeout: float = 30.0) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            self.wait_for(
                lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip(), timeout, "jobs gone"
            )

    def _start_munged(self) -> None:
        if _munge_works():
            return  # someone else's munged: use it, leave it running
        MUNGE_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
        pid_file = MUNGE_RUN_DIR / "munged.pid"
        self._started["munged"] = pid_file
        result = subprocess.run(
            ["runuser", "-u", "munge", "--", _which("munged"), f"--pid-file={pid_file}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode:
            raise RuntimeError(f"munged failed to start ({result.returncode}): {result.stderr}")
        self.wait_for(_munge_works, 10, "munged to answer munge -n | unmunge")


def _which(name: str) -> str | None:
    # slurmctld, slurmd and munged live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _munge_works() -> bool:
    try:
        credential = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if credential.returncode:
            return False
        return subprocess.run(["unmunge"], input=credential.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _free_ports(count: int) -> list[int]:
    """Ports that are free on 127.0.0.1 right now (all held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _stop_daemon(name: str, pid_file: Path, timeout: float = 15.0) -> None:
    """SIGTERM the pid in ``pid_file`` if that process is ``name``, then SIGKILL it if it outlives ``timeout``."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if not _is_process(pid, name):
        return  # gone already, or the pid now belongs to something else: leave it alone
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_process(pid, name):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def _running(*names: str) -> bool:
    """True when a live process with one of these names exists (any owner)."""
    return any(_is_process(int(p.name), name) for p in Path("/proc").iterdir() if p.name.isdigit() for name in names)


def _is_process(pid: int, name: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm == name[:15] and state != "Z"
