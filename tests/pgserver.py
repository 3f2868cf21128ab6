"""A throwaway PostgreSQL server for the tests: `initdb` into a temporary folder, `pg_ctl`
on a free loopback port, password authentication, stopped and deleted afterwards.

It needs the server binaries (Debian's `postgresql` package; `.ci/run` installs it). The
server refuses to run as root, so under root it runs as the `postgres` user the package
creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "mnist"
# Deliberately distinctive, so a test can grep every output for it.
PASSWORD = "pw-Zq7-never-shown"


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's versioned one, newest first, else
    whatever PATH has."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for folder in reversed(candidates):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def why_unavailable() -> str | None:
    """None if a server can be started here, else the reason (for pytest.skip)."""
    if find_bindir() is None:
        return "the PostgreSQL server (initdb, pg_ctl) is not installed: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[postgres]'"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One server; `url(db)` names a database on it, `create_database` makes one."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        """`settings`: more server settings (`-c name=value`), e.g. a `max_connections`
        above the default 100 for benchmarks/load.py's many workers."""
        self.settings = dict(settings or {})
        bindir = find_bindir()
        assert bindir is not None, why_unavailable()
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mnist-study-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        self.start()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bindir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            # Skips only the flushes that guard against the machine crashing; a crash of the
            # server (`stop("immediate")`) must still keep every commit it acknowledged.
            "-c fsync=off -c full_page_writes=off"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data),
                  "-l", str(self.log), "-o", options)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash as far as clients can tell: connections cut, no goodbye."""
        self._run("pg_ctl", "stop", "-w", "-t", "30", "-D", str(self.data), "-m", mode)

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
            dbname="postgres", autocommit=True,
        ) as connection:  # fmt: skip
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
