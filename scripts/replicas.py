"""Run several MedSAM2 server replicas behind nginx (deploy/nginx/medsam2-replicas.conf) on one machine, and keep
them running.

    .venv/bin/python scripts/replicas.py --replicas 2 --port 8000 --studies demo/studies -- --conf checkpoint random

Viewers use http://127.0.0.1:8000; the replicas listen on the next ports (8001, 8002, ...), share the studies
folder (or the PACS given as --studies) and the app's model folder (published weights, training lock, train
stats). Supervision: when a replica exits (a crash, the OOM killer, a SIGKILL), nginx and the other replicas keep
serving (nginx skips a replica that refuses connections) and the launcher starts the dead one again after a
back-off (1 s, doubling up to 60 s while it keeps dying; back to 1 s once it has run for a minute). Its pid is
in ``<run-dir>/replica-<n>.pid``, its log in ``<run-dir>/replica-<n>.log``. Ctrl+C (SIGINT) or SIGTERM stops
them all. On several machines, start `monailabel start_server` on each and render the nginx config with their
addresses (``--upstream host:port``, repeated, without --replicas). ``--front none`` supervises the replicas
without nginx (a system nginx is the front: scripts/install_server.py). Every option has an environment
variable (in brackets in --help), and ``--env-file`` reads them, with MONAI Label's own settings, from a file.
See docs/scale_out.md and docs/operations.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "nginx" / "medsam2-replicas.conf"
PROXY_RULES = REPO / "deploy" / "nginx" / "medsam2-proxy.conf"
MAPS = REPO / "deploy" / "nginx" / "medsam2-maps.conf"
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_AFTER_S = 60.0  # a child that ran this long is restarted after FIRST_BACKOFF_S again


def render_nginx_conf(listen: str, upstreams: list[str], run_dir: Path, fail_timeout_s: int = 10) -> Path:
    """Write ``run_dir/nginx.conf`` from the shipped template; returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = TEMPLATE.read_text().replace("@@RUN_DIR@@", str(run_dir.resolve()))
    text = text.replace("@@LISTEN@@", listen).replace("@@SERVERS@@", upstream_servers(upstreams, fail_timeout_s))
    text = text.replace("@@PROXY_RULES@@", str(PROXY_RULES)).replace("@@MAPS@@", str(MAPS))
    conf = run_dir / "nginx.conf"
    conf.write_text(text)
    return conf


def upstream_servers(upstreams: list[str], fail_timeout_s: int = 10) -> str:
    """The ``server`` lines of nginx's upstream block: a replica that fails is skipped for ``fail_timeout_s``."""
    return "\n".join(f"        server {address} max_fails=1 fail_timeout={fail_timeout_s}s;" for address in upstreams)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if not found:
        raise SystemExit("nginx is not installed: apt-get install nginx (scripts/install_pacs_tools.sh does).")
    return found


def start_nginx(conf: Path) -> subprocess.Popen:
    """Check and start nginx in the foreground (the caller stops it with terminate())."""
    binary = nginx_binary()
    prefix = str(conf.parent.resolve())
    check = subprocess.run([binary, "-t", "-q", "-p", prefix, "-c", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused {conf}:\n{check.stderr}")
    return subprocess.Popen([binary, "-p", prefix, "-c", str(conf), "-g", "daemon off;"])


def start_replica(index: int, port: int, studies: str, extra: list[str], log_dir: Path) -> subprocess.Popen:
    """One ``monailabel start_server`` of this app, named ``replica-<index>``, in its own process group (its
    training runs too); its log is appended to ``log_dir/replica-<index>.log``, its pid written beside it."""
    bin_dir = Path(sys.executable).parent  # the venv's: its `monailabel` launcher runs the `python` on PATH
    cmd = [str(bin_dir / "monailabel"), "start_server", "--app", str(REPO / "apps" / "medsam2")]
    cmd += ["--studies", studies, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--conf", "replica_name", f"replica-{index}", *extra]
    env = {**os.environ, "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", "")}
    with open(log_dir / f"replica-{index}.log", "a") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env, start_new_session=True
        )
    (log_dir / f"replica-{index}.pid").write_text(f"{process.pid}\n")
    return process


def wait_ready(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Wait for ``url/health/ready`` to answer 200 (fail at once if ``process`` exits)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {process.returncode}: see its log")
        try:
            if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")


@dataclass
class Child:
    """A supervised process: started by ``start``, started again after a back-off whenever it exits."""

    name: str
    start: Callable[[], subprocess.Popen]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None
    restarts: int = 0

    def launch(self, now: float | None = None) -> None:
        """Start the process (``now``: the supervisor's clock, ``time.monotonic()``)."""
        self.process, self.restart_at = self.start(), None
        self.started_at = time.monotonic() if now is None else now

    def check(self, now: float) -> None:
        """Restart the process if it exited and its back-off has passed; log what happens."""
        if self.restart_at is None:
            status = self.process.poll()
            if now - self.started_at >= STABLE_AFTER_S:
                self.backoff_s = FIRST_BACKOFF_S
            if status is None:
                return
            self.restart_at = now + self.backoff_s
            pid, wait_s = self.process.pid, self.backoff_s
            say(f"{self.name} (pid {pid}) exited with status {status}: restarting it in {wait_s:g} s")
            self.backoff_s = min(2 * self.backoff_s, MAX_BACKOFF_S)
        elif now >= self.restart_at:
            self.launch(now)
            self.restarts += 1
            say(f"{self.name} restarted (pid {self.process.pid}, restart {self.restarts})")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, wait_s: float = 30.0) -> None:
        """SIGTERM the process group (the replica and its training run), SIGKILL it after ``wait_s``."""
        if not self.running():
            return
        _signal_group(self.process, signal.SIGTERM)
        self.wait_or_kill(wait_s)

    def wait_or_kill(self, wait_s: float) -> None:
        try:
            self.process.wait(timeout=max(wait_s, 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=30)


def stop_all(children: list[Child], wait_s: float = 30.0) -> None:
    """SIGTERM the replicas (all at once), wait for them (SIGKILL after ``wait_s``), then stop the front."""
    replicas = [c for c in children if c.name != "nginx" and c.running()]
    for child in replicas:
        _signal_group(child.process, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    for child in replicas:
        child.wait_or_kill(deadline - time.monotonic())
    for child in children:
        child.stop(wait_s)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        if os.getpgid(process.pid) == process.pid:  # a replica: its own process group
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except ProcessLookupError:
        pass


def say(message: str) -> None:
    print(f"replicas: {message}", flush=True)


def stop_on_signals(children: list[Child]) -> None:
    """On SIGTERM/SIGINT: stop every child (replicas first, the front last) and exit 0."""

    def stop(*_: object) -> None:
        stop_all(children)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def supervise(children: list[Child], poll_s: float = 0.5) -> None:
    """Keep every child running (until a signal ends this process)."""
    while True:
        now = time.monotonic()
        for child in children:
            child.check(now)
        time.sleep(poll_s)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"MEDSAM2_{name}", default)


def load_env_file(argv: list[str]) -> None:
    """``--env-file FILE``: its ``KEY=VALUE`` lines (python-dotenv's format, as systemd's EnvironmentFile) go into
    this process's environment (and so the replicas'), without overriding variables set already."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env-file")
    known, _ = pre.parse_known_args(argv)
    if known.env_file:
        from dotenv import dotenv_values

        path = Path(known.env_file)
        if not path.is_file():
            raise SystemExit(f"replicas: the settings file {path} does not exist")
        for key, value in dotenv_values(path).items():
            if value is not None:
                os.environ.setdefault(key, value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--env-file", help="KEY=VALUE settings (the MEDSAM2_* below, MONAI_LABEL_* for MONAI Label) read first")
    add("--replicas", type=int, default=int(_env("REPLICAS", "0")), help="replicas on this machine [MEDSAM2_REPLICAS]")
    add("--upstream", action="append", default=[], help="host:port of a replica started elsewhere")
    add("--port", type=int, default=int(_env("PORT", "8000")), help="nginx's port [MEDSAM2_PORT]")
    add("--replica-port", type=int, default=int(_env("REPLICA_PORT", "0")), help="first replica's port (default: "
        "--port + 1, the next ones after it) [MEDSAM2_REPLICA_PORT]")  # fmt: skip
    add("--host", default=_env("HOST", "127.0.0.1"), help="nginx's address [MEDSAM2_HOST]")
    add("--front", choices=("nginx", "none"), default=_env("FRONT", "nginx"), help="none: replicas only, behind "
        "a front started elsewhere (a system nginx) [MEDSAM2_FRONT]")  # fmt: skip
    add("--studies", default=_env("STUDIES", str(REPO / "demo" / "studies")), help="folder or DICOMweb URL "
        "[MEDSAM2_STUDIES]")  # fmt: skip
    add("--checkpoint", default=_env("CHECKPOINT", ""), help="the weights: --conf checkpoint [MEDSAM2_CHECKPOINT]")
    add("--run-dir", default=_env("RUN_DIR", str(REPO / ".replicas")), help="nginx config, logs, replica logs "
        "and pids [MEDSAM2_RUN_DIR]")  # fmt: skip
    add("extra", nargs="*", help="after --: arguments for every replica's start_server (then MEDSAM2_CONF's)")
    args = parser.parse_args(argv)
    args.extra = [*args.extra, *shlex.split(_env("CONF", ""))]
    if args.checkpoint:
        args.extra = ["--conf", "checkpoint", args.checkpoint, *args.extra]
    args.replica_port = args.replica_port or args.port + 1
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    load_env_file(argv)
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = [args.replica_port + i for i in range(args.replicas)]
    upstreams = [f"127.0.0.1:{port}" for port in ports] + args.upstream
    if not upstreams:
        raise SystemExit("Give --replicas N and/or --upstream host:port.")
    replicas = [
        Child(f"replica-{i + 1}", lambda i=i, port=port: start_replica(i + 1, port, args.studies, args.extra, run_dir))
        for i, port in enumerate(ports)
    ]
    children = list(replicas)
    if args.front == "nginx":
        conf = render_nginx_conf(f"{args.host}:{args.port}", upstreams, run_dir)
        children.insert(0, Child("nginx", lambda: start_nginx(conf)))
    stop_on_signals(children)
    for child in children:
        child.launch()
    try:
        for port, replica in zip(ports, replicas, strict=True):
            wait_ready(f"http://127.0.0.1:{port}", 600, replica.process)
    except (RuntimeError, TimeoutError) as e:  # a replica that cannot start is a setting to fix, not to retry
        stop_all(children)
        raise SystemExit(f"replicas: {e} ({run_dir})") from e
    where = f"behind http://{args.host}:{args.port}" if args.front == "nginx" else f"on ports {ports}"
    print(f"{len(upstreams)} replicas {where} (logs in {run_dir})", flush=True)
    supervise(children)


if __name__ == "__main__":
    main()
