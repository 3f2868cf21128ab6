"""A throwaway one-node SLURM cluster for the tests: `munged`, `slurmctld` and `slurmd`
on the loopback address, each with its files in one temporary folder, stopped and deleted
afterwards; nothing of the machine's own (/etc/slurm, /etc/munge, /run) is touched.

It needs Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them) and root:
the daemons run as root (`SlurmUser=root`), with no cgroups (`proctrack/linuxproc`,
`task/none`), the node declared with this machine's CPUs and no GPU. Clients find the
cluster through `SLURM_CONF` (`env`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
START_S = 30.0


def why_unavailable() -> str | None:
    """None if a cluster can be started here, else the reason (for pytest.skip)."""
    missing = [tool for tool in (*DAEMONS, *CLIENTS) if _find(tool) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the throwaway cluster's daemons run as root, and this is not root"
    return None


def _find(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One controller and one node, `host`, in partition `debug`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mnist-study-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self.munge_socket = munge / "munge.sock"
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(self._config())
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        try:
            self._start(
                "munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            )  # fmt: skip
            self._start("slurmctld")
            self._start("slurmd")
            self._wait_idle()
        except BaseException:
            self.close()
            raise

    def _config(self) -> str:
        r = self.root
        for folder in ("state", "spool", "log"):
            (r / folder).mkdir()
        return f"""\
ClusterName=throwaway
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued task waits this long (+1 s) before it may start again (120 s
# by default, too long for a test of preemption).
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
# Every second rather than every minute: a requeued task starts as soon as it may.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=30
InactiveLimit=0
MinJobAge=300
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def _start(self, daemon: str, *args: str) -> None:
        tool = _find(daemon)
        assert tool is not None, why_unavailable()
        subprocess.run([tool, *args], env=self.env, check=True, capture_output=True, timeout=30)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_S
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(
            f"the throwaway SLURM node is {state or 'unknown'}, not idle: {self.logs()}"
        )

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client against this cluster."""
        return subprocess.run(
            [tool, *args], env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    def tasks(self, job: str | None = None) -> dict[str, str]:
        """Each task still known to the controller (ID such as 12_0) and its state."""
        args = ["--noheader", "--array", "--format=%i %T"] + (["--jobs", job] if job else [])
        out = self.run("squeue", *args, check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def logs(self) -> str:
        return "\n".join(
            f"{p.name}: {p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*"))
        )

    def cancel_all(self, wait_s: float = 30.0) -> None:
        """Kill every job's processes at once, and wait until the controller has none."""
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.run("scancel", "--full", "--signal=KILL", f"--user={user}", check=False)
        deadline = time.monotonic() + wait_s
        while self.tasks() and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        """Cancel every job, stop the daemons, delete the folder."""
        self.cancel_all(wait_s=15)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = self.root / pid_file
            if path.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(path.read_text().split()[0]), 15)
        deadline = time.monotonic() + 10
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = self.root / pid_file
            while path.exists() and _alive(path) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (ProcessLookupError, ValueError, OSError):
        return False
    return True
