"""A one-node Slurm on this machine, to try (and test) the SLURM path without a cluster.

    python -m launch.local_slurm start [--dir DIR]     # prints: export SLURM_CONF=DIR/slurm.conf
    SLURM_CONF=DIR/slurm.conf sbatch --chdir "$PWD" launch/slurm.sbatch configs/pretrain/demo_mae.yaml ...
    python -m launch.local_slurm stop [--dir DIR]

Needs root (the daemons run as root, ``SlurmUser=root``) and Debian's packages ``slurmctld slurmd
slurm-client munge`` (installed with apt-get when missing). Its config, state, spool and logs live in
DIR (default /tmp/scpretrain-slurm); the daemons are started and stopped by their PID files. One
partition ``cpu`` with every core of this machine; ``JobRequeue=1``; ``KillWait=60`` (the seconds
between SIGTERM and SIGKILL when a job is cancelled, requeued or preempted: room for a checkpoint);
``AuthInfo=cred_expire=10`` (a requeued job may start again after 10 s instead of Slurm's default 120 s:
one node, no slow prologs); the scheduler looks at pending jobs every 2 s (default 60 s / 30 s).
munge uses the system key (``/etc/munge/munge.key``, made when missing) and socket.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path("/tmp/scpretrain-slurm")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


class SlurmUnavailable(RuntimeError):
    pass


def _ensure_packages() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and this is not root: apt-get install " + " ".join(PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {(p.stderr or p.stdout).strip()[-300:]}")


def _ensure_munge() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return  # munged already answers
    p = subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SlurmUnavailable(f"munged did not start: {p.stderr.strip()[-300:]}")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024  # leave 1 GiB to the system
    return 4096


def write_conf(d: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=scpretrain-local
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobRequeue=1
ReturnToService=2
KillWait=60
MinJobAge=3600
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
NodeName={host} CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start(d: Path = DEFAULT_DIR, timeout: float = 60) -> dict[str, str]:
    """Start the cluster (or find it running); returns the environment clients need (SLURM_CONF)."""
    d = Path(d)
    _ensure_packages()
    _ensure_munge()
    d.mkdir(parents=True, exist_ok=True)
    conf = write_conf(d)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    if _pid(d / "slurmctld.pid") is None:
        subprocess.run(["slurmctld", "-i", "-f", str(conf)], env=env, check=True, capture_output=True)
    if _pid(d / "slurmd.pid") is None:
        subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True, capture_output=True)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        state = p.stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return {"SLURM_CONF": str(conf)}
        time.sleep(1)
    raise SlurmUnavailable(f"the node is not up after {timeout:.0f} s (sinfo: {state!r}); see {d}/slurmctld.log "
                           f"and {d}/slurmd.log")


def stop(d: Path = DEFAULT_DIR) -> None:
    d = Path(d)
    for name in ("slurmd", "slurmctld"):
        pid = _pid(d / f"{name}.pid")
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if _pid(d / f"{name}.pid") is None:
                    break
                time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local_slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    a = p.parse_args(argv)
    try:
        if a.action == "start":
            env = start(a.dir)
            print(f"Slurm is up (partition cpu, {os.cpu_count()} CPUs). Clients need:\n"
                  f"export SLURM_CONF={env['SLURM_CONF']}")
        else:
            stop(a.dir)
            print("stopped")
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
