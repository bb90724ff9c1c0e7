"""A real single-node Slurm cluster on localhost, for the launcher's tests.

Starts munge, MariaDB, slurmdbd, slurmctld and slurmd from Debian's packages with their configs,
state, sockets and logs in one private folder and on free ports, so it touches nothing system-wide
and stops exactly what it started. Accounting (slurmdbd) is there because without it ``sacct``
fails and submitit cannot learn that a cancelled job ended.

    python tests/slurm_cluster.py start DIR    # start in the background; prints the SLURM_CONF to export
    python tests/slurm_cluster.py run DIR      # the same, in the foreground until Ctrl-C
    python tests/slurm_cluster.py stop DIR     # stop what `start DIR` started (from its pid files)

The cluster has two partitions on one node: ``debug`` (default) and ``urgent``, a higher
priority tier whose jobs preempt ``debug`` jobs with PreemptMode=REQUEUE.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEBIAN_PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server"]
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here (not root, packages missing and not installable)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_packages() -> None:
    """Install the Debian packages if any daemon is missing (root only)."""
    missing = [exe for exe in ("munged", "mungekey", "slurmctld", "slurmd", "slurmdbd", "sbatch", "mariadbd",
                               "mariadb-install-db") if shutil.which(exe) is None
               and not Path("/usr/sbin", exe).exists() and not Path("/usr/bin", exe).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm test cluster needs root to install {', '.join(DEBIAN_PACKAGES)} "
                                 f"(missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterUnavailable(f"apt-get install failed:\n{r.stderr[-2000:]}")


class LocalSlurmCluster:
    def __init__(self, root: str | os.PathLike, cpus: int = 8, name: str = "largewave"):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.name = name
        self.node = socket.gethostname()
        self.procs: dict[str, subprocess.Popen] = {}

    # paths ------------------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, squeue, sacct, submitit) talking to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def log(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    # lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalSlurmCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("the Slurm test cluster runs its daemons as root (SlurmUser=root); not root here")
        ensure_packages()
        for sub in ("etc", "log", "run", "state", "spool", "db", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self.ports = {k: _free_port() for k in ("db", "dbd", "ctld", "slurmd")}
        try:
            self._start_munge()
            self._start_mariadb(timeout)
            self._write_slurm_confs()
            self._spawn("slurmdbd", ["slurmdbd", "-D"])  # reads slurmdbd.conf beside SLURM_CONF
            self._wait_port(self.ports["dbd"], "slurmdbd", timeout)
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._client(["sinfo", "-h"]).returncode == 0, "slurmctld", timeout)
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait(self._node_idle, "slurmd (node idle)", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # helpers ----------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        logf = open(self.log(name + ".stdout"), "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = ""
                for f in (self.log(name), self.log(name + ".stdout")):
                    if f.exists():
                        tail += f.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with status {p.returncode}:\n{tail}")

    def _wait(self, ok, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.root / 'log'}")

    def _wait_port(self, port: int, what: str, timeout: float) -> None:
        def ok():
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex(("127.0.0.1", port)) == 0
        self._wait(ok, what, timeout)

    def _client(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)

    def _node_idle(self) -> bool:
        r = self._client(["sinfo", "-h", "-N", "-o", "%t"])
        return r.returncode == 0 and r.stdout.strip().startswith("idle")

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.log('munged')}"])
        self._wait(lambda: self.munge_socket.exists(), "munged", 20)

    def _start_mariadb(self, timeout: float) -> None:
        data = self.root / "db"
        self.db_password = "largewave-test"
        if not (data / "mysql").exists():
            r = subprocess.run(["mariadb-install-db", f"--datadir={data}", "--user=root",
                                "--auth-root-authentication-method=normal", "--skip-test-db"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
        init = self.root / "etc" / "db-init.sql"
        init.write_text(
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}';\n"
            f"CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{self.db_password}';\n"
            "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';\nGRANT ALL ON *.* TO 'slurm'@'localhost';\n"
        )
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
                                 "--bind-address=127.0.0.1", f"--port={self.ports['db']}",
                                 f"--socket={self.root / 'run' / 'mysqld.sock'}",
                                 f"--pid-file={self.root / 'run' / 'mysqld.pid'}",
                                 f"--init-file={init}", f"--log-error={self.log('mariadbd')}",
                                 "--innodb-buffer-pool-size=32M", "--skip-log-bin"])
        self._wait_port(self.ports["db"], "mariadbd", timeout)

    def _write_slurm_confs(self) -> None:
        r = self.root
        auth = f"socket={self.munge_socket}"
        dbd = r / "etc" / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo={auth}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports['dbd']}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports['db']}
StorageUser=slurm
StoragePass={self.db_password}
StorageLoc=slurm_acct_db_{self.name.replace('-', '_')}
PidFile={r / 'run' / 'slurmdbd.pid'}
LogFile={self.log('slurmdbd')}
DebugLevel=info
""")
        os.chmod(dbd, 0o600)
        self.conf.write_text(f"""\
ClusterName={self.name}
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo={auth},cred_expire=10
CredType=cred/munge
SlurmctldPort={self.ports['ctld']}
SlurmdPort={self.ports['slurmd']}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={self.log('slurmctld')}
SlurmdLogFile={self.log('slurmd')}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
InactiveLimit=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.ports['dbd']}
AccountingStoragePass={self.munge_socket}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")


def stop_from_pidfiles(root: str | os.PathLike, timeout: float = 15.0) -> list[str]:
    """Stop the daemons of a cluster started in ``root`` by another process (``start DIR``), from
    the pid files they wrote; returns the names of those that were running."""
    run = Path(root).resolve() / "run"
    files = {"slurmd": "slurmd.pid", "slurmctld": "slurmctld.pid", "slurmdbd": "slurmdbd.pid",
             "mariadbd": "mysqld.pid", "munged": "munged.pid"}
    stopped = []
    for name in reversed(DAEMONS):
        f = run / files[name]
        try:
            pid = int(f.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
        stopped.append(name)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return stopped


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "run", "stop"])
    ap.add_argument("dir", help="private folder for the cluster's configs, state, sockets and logs")
    args = ap.parse_args(argv)
    if args.action == "stop":
        stopped = stop_from_pidfiles(args.dir)
        print(f"stopped {', '.join(stopped)}" if stopped else f"nothing was running from {args.dir}")
        return 0
    cluster = LocalSlurmCluster(args.dir)
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}")
    if args.action == "run":  # keep the daemons in the foreground until interrupted
        try:
            signal.pause()
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
