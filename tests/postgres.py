"""A real PostgreSQL server for the tests: a fresh cluster in a temporary folder, on a free port.

Debian's `postgresql` package puts its binaries under /usr/lib/postgresql/<major>/bin. `initdb`
refuses to run as root, so as root the cluster belongs to the `postgres` user the package creates.
Where no server is installed the tests that need one skip with a one-line reason; under CI (CI=1)
they fail instead, because `.ci/run` installs one.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PgCluster:
    folder: Path
    port: int
    bin_dir: Path
    as_user: str | None

    @property
    def url(self) -> str:
        return f"postgresql://p402@127.0.0.1:{self.port}/postgres"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://p402@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_user:
            command = ["runuser", "-u", self.as_user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", mode, "-w", "stop", check=False)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        done = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "p402", "-d", dbname, "-Atc", sql)
        return done.stdout

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return self.url_for(name)


def find_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian links a few of them onto PATH; the rest sit beside the target
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster() -> PgCluster:
    """Raises LookupError (with the reason) when no PostgreSQL server is installed."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise LookupError("PostgreSQL is not installed (no initdb; Debian: apt-get install postgresql)")
    as_user = None
    if os.geteuid() == 0:
        as_user = "postgres"
        try:
            import pwd

            pwd.getpwnam(as_user)
        except KeyError:
            raise LookupError("running as root and there is no `postgres` user to own the test cluster") from None
    folder = Path(tempfile.mkdtemp(prefix="p402-pg-"))
    if as_user:
        shutil.chown(folder, user=as_user)
    cluster = PgCluster(folder, _free_port(), bin_dir, as_user)
    cluster._run("initdb", "-D", str(folder / "data"), "-U", "p402", "--auth=trust", "-E", "UTF8", "--no-sync")
    cluster.start()
    deadline = time.monotonic() + 20
    while cluster._run("pg_isready", "-h", "127.0.0.1", "-p", str(cluster.port), check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start: {(folder / 'log').read_text()[-2000:]}")
        time.sleep(0.1)
    return cluster


def remove_cluster(cluster: PgCluster) -> None:
    cluster.stop("immediate")
    shutil.rmtree(cluster.folder, ignore_errors=True)
