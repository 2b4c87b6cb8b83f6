"""A throwaway one-node Slurm cluster on this machine: munged, slurmctld and slurmd on localhost.

``start_local_slurm(cpus)`` installs Debian's ``slurm-wlm`` and ``munge`` with apt-get when they
are missing (only as root), writes ``slurm.conf`` and a munge key into a fresh temporary
directory, starts the three daemons in the foreground on ports the OS picked free, and waits for
the node to come up. ``LocalSlurm.stop()`` cancels what is still queued and stops the daemons by
their own pids. Anything that prevents this raises :class:`SlurmUnavailable` with the reason.

Why the settings: ``SlurmdParameters=config_overrides`` lets the node declare more CPUs than the
machine has, so an 8-task job fits on a 2-core machine; ``proctrack/linuxproc`` and ``task/none``
need no cgroups; ``AuthInfo=socket=`` points every Slurm component (clients included, through
``SLURM_CONF``) at this cluster's own munged, so nothing under /etc or /run is touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from progress import Stall, run_until_stalled

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
# Daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DONE_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why."""


def _missing() -> list[str]:
    return [c for c in DAEMONS + CLIENTS if shutil.which(c, path=SEARCH_PATH) is None]


def ensure_installed(timeout_s: float = 900.0) -> None:
    """Install slurm-wlm and munge with apt-get when any of their commands is missing (root only)."""
    missing = _missing()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"{', '.join(missing)} not installed, and installing slurm-wlm and munge needs root"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"],
    ):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-500:]}")
    if _missing():
        raise SlurmUnavailable(f"still missing after apt-get install: {', '.join(_missing())}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf for one node ``host`` with ``cpus`` CPUs; every path under ``root``."""
    return f"""\
ClusterName=copdlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=local Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running local cluster. ``env`` is the environment for Slurm commands (``SLURM_CONF``)."""

    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 120.0) -> str:
        """Run a Slurm client command against this cluster; its stdout, or an error with stderr.

        On a busy machine the daemons answer late: the command is waited for as long as it or
        the daemons keep using CPU, and fails only after ``timeout`` seconds without progress.
        """
        stall = Stall(self._daemon_pids, timeout, f"`{' '.join(cmd)}`")
        while True:
            try:
                res = run_until_stalled(list(cmd), timeout, env=self.env)
                break
            except TimeoutError:
                self._check_daemons()
                stall.check()  # the daemons worked meanwhile: ask again
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit ``sbatch --parsable ARGS`` from ``cwd``; returns the job id.

        ``env`` replaces the job's environment (sbatch exports it to the job), except that it
        always points at this cluster.
        """
        job_env = {**(self.env if env is None else env)}
        job_env.update(SLURM_CONF=self.env["SLURM_CONF"], PATH=self.env["PATH"])
        res = run_until_stalled(["sbatch", "--parsable", *args], 120.0, cwd=cwd, env=job_env)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job_state(self, job: int) -> tuple[str, str]:
        """(JobState, ExitCode) from ``scontrol show job`` (kept for MinJobAge after the end)."""
        fields = dict(
            kv.split("=", 1) for kv in self.run("scontrol", "-o", "show", "job", str(job)).split()
            if "=" in kv
        )  # fmt: skip
        return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "?")

    def wait(self, job: int, timeout_s: float, poll_s: float = 2.0) -> tuple[str, str]:
        """Poll until ``job`` ends; (JobState, ExitCode). Waits as long as the cluster (daemons,
        job steps and their tasks) makes progress; cancels the job and raises after ``timeout_s``
        seconds without any CPU use."""
        stall = Stall(self._daemon_pids, timeout_s, f"job {job}")
        while True:
            state, code = self.job_state(job)
            if state in DONE_STATES:
                return state, code
            self._check_daemons()
            try:
                stall.check()
            except TimeoutError as e:
                self.run("scancel", str(job))
                raise TimeoutError(f"job {job} still {state}: {e}; cancelled") from e
            time.sleep(poll_s)

    def _daemon_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def _check_daemons(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise SlurmUnavailable(
                    f"{name} exited with {p.returncode}:\n{_tail(self.root / f'{name}.log')}"
                )

    def stop(self) -> None:
        """Cancel what is still queued (every job here is ours: the cluster is private), stop
        the daemons by their pids, newest first, and remove the cluster's files."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                deadline = time.monotonic() + 30
                while (queued := self.run("squeue", "-h", "-o", "%i").split()) and (
                    time.monotonic() < deadline
                ):
                    self.run("scancel", *queued)
                    time.sleep(1)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the daemons are stopped below either way
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path.name})"


def _spawn(cluster: LocalSlurm, name: str, *args: str) -> None:
    exe = shutil.which(name, path=SEARCH_PATH)
    log = (cluster.root / f"{name}.log").open("w")
    cluster.procs[name] = subprocess.Popen(
        [exe, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=cluster.env,
    )  # fmt: skip


def start_local_slurm(cpus: int = 8, timeout_s: float = 300.0) -> LocalSlurm:
    """Install if needed, start munged + slurmctld + slurmd, and wait for the node to be idle."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local Slurm needs root (slurmd runs as root to start job steps)")
    ensure_installed()
    # munged wants every directory above its socket searchable by all: not a 0700 pytest tmp dir.
    root = Path(tempfile.mkdtemp(prefix="copd-slurm-"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, cpus, _free_port(), _free_port()))
    # Variables of an enclosing Slurm job would leak into this cluster's jobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), PATH=SEARCH_PATH)
    cluster = LocalSlurm(root, env)
    try:
        _spawn(cluster, "munged", "--foreground", f"--socket={root}/munge/munge.socket",
               f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
               f"--seed-file={root}/munge/munged.seed", f"--log-file={root}/munge/munged.log")  # fmt: skip
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), cluster, "munged", timeout_s)
        _spawn(cluster, "slurmctld", "-D", "-f", str(conf))
        _spawn(cluster, "slurmd", "-D", "-f", str(conf), "-N", host)
        _wait_for(lambda: _node_state(cluster) == "idle", cluster, "slurmd", timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def local_slurm_fixture(cpus: int, what: str):
    """A module-scoped pytest fixture: a local Slurm whose node declares ``cpus`` CPUs, stopped
    after the module; the module's tests are skipped (naming ``what``) where none can start."""
    import pytest

    @pytest.fixture(scope="module")
    def slurm():
        try:
            cluster = start_local_slurm(cpus=cpus)
        except SlurmUnavailable as e:
            pytest.skip(f"no local Slurm for {what}: {e}")
        try:
            yield cluster
        finally:
            cluster.stop()

    return slurm


def _node_state(cluster: LocalSlurm) -> str:
    try:
        res = run_until_stalled(["sinfo", "-h", "-o", "%t"], 60.0, env=cluster.env)
    except TimeoutError:
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _wait_for(ready, cluster: LocalSlurm, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        cluster._check_daemons()
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {n}.log\n{_tail(cluster.root / f'{n}.log')}" for n in cluster.procs
            )
            raise SlurmUnavailable(f"{what} not ready after {timeout_s:.0f}s\n{logs}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """``python tests/slurm_local.py [--cpus N] [--timeout S] -- COMMAND...``

    Starts a local cluster, runs COMMAND with ``SLURM_CONF`` pointing at it (e.g. a script that
    calls sbatch), waits until the queue is empty, then stops the cluster.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="slurm_local.py", description=main.__doc__)
    ap.add_argument("--cpus", type=int, default=8, help="CPUs the node declares")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the jobs")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give a command after --, e.g. -- slurm/scaling_study.sh")
    try:
        cluster = start_local_slurm(args.cpus)
    except SlurmUnavailable as e:
        print(f"slurm_local.py: {e}", file=sys.stderr)
        return 1
    try:
        rc = subprocess.run(command, env=cluster.env).returncode
        deadline = time.monotonic() + args.timeout
        while rc == 0 and cluster.run("squeue", "-h", "-o", "%i").strip():
            if time.monotonic() > deadline:
                print(
                    f"slurm_local.py: jobs still queued after {args.timeout:.0f}s", file=sys.stderr
                )
                return 1
            time.sleep(5)
        return rc
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
