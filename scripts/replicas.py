"""Run several MedSAM2 server replicas behind nginx (deploy/nginx/medsam2-replicas.conf) on one machine.

    .venv/bin/python scripts/replicas.py --replicas 2 --port 8000 --studies demo/studies -- --conf checkpoint random

Viewers use http://127.0.0.1:8000; the replicas listen on the next ports (8001, 8002, ...), share the studies
folder (or the PACS given as --studies) and the app's model folder (published weights, training lock, train
stats). Ctrl+C stops them all. On several machines, start `monailabel start_server` on each and render the
nginx config with their addresses (``--upstream host:port``, repeated, without --replicas). See docs/scale_out.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "nginx" / "medsam2-replicas.conf"


def render_nginx_conf(listen: str, upstreams: list[str], run_dir: Path, fail_timeout_s: int = 10) -> Path:
    """Write ``run_dir/nginx.conf`` from the shipped template; returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(
        f"        server {address} max_fails=1 fail_timeout={fail_timeout_s}s;" for address in upstreams
    )
    text = TEMPLATE.read_text().replace("@@RUN_DIR@@", str(run_dir.resolve()))
    text = text.replace("@@LISTEN@@", listen).replace("@@SERVERS@@", servers)
    conf = run_dir / "nginx.conf"
    conf.write_text(text)
    return conf


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
    """One ``monailabel start_server`` of this app, named ``replica-<index>``."""
    bin_dir = Path(sys.executable).parent  # the venv's: its `monailabel` launcher runs the `python` on PATH
    cmd = [str(bin_dir / "monailabel"), "start_server", "--app", str(REPO / "apps" / "medsam2")]
    cmd += ["--studies", studies, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--conf", "replica_name", f"replica-{index}", *extra]
    log = open(log_dir / f"replica-{index}.log", "w")
    env = {**os.environ, "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env, start_new_session=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=0, help="replicas to start on this machine")
    parser.add_argument("--upstream", action="append", default=[], help="host:port of a replica started elsewhere")
    parser.add_argument("--port", type=int, default=8000, help="nginx's port (replicas: the next ones)")
    parser.add_argument("--host", default="127.0.0.1", help="nginx's address")
    parser.add_argument("--studies", default=str(REPO / "demo" / "studies"))
    parser.add_argument("--run-dir", default=str(REPO / ".replicas"), help="nginx config, logs, replica logs")
    parser.add_argument("extra", nargs="*", help="after --: arguments for every replica's start_server")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    replicas = [
        start_replica(i + 1, args.port + 1 + i, args.studies, args.extra, run_dir) for i in range(args.replicas)
    ]
    upstreams = [f"127.0.0.1:{args.port + 1 + i}" for i in range(args.replicas)] + args.upstream
    if not upstreams:
        raise SystemExit("Give --replicas N and/or --upstream host:port.")
    nginx = start_nginx(render_nginx_conf(f"{args.host}:{args.port}", upstreams, run_dir))
    processes = [nginx, *replicas]

    def stop(*_: object) -> None:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for address, replica in zip(upstreams, replicas, strict=False):  # --upstream ones are not ours to wait for
        wait_ready(f"http://{address}", 600, replica)
    print(f"{len(upstreams)} replicas behind http://{args.host}:{args.port} (logs in {run_dir})", flush=True)
    while all(p.poll() is None for p in processes):
        time.sleep(1)
    stop()


if __name__ == "__main__":
    main()
