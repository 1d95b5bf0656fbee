"""Install the MedSAM2 server as a systemd service on a Debian or Ubuntu server, behind the system's nginx with TLS.

    sudo python3 scripts/install_server.py --server-name annotate.hospital.example \\
        --tls-cert /etc/ssl/certs/annotate.pem --tls-key /etc/ssl/private/annotate.key \\
        --studies https://pacs.hospital.example/dicom-web --checkpoint MedSAM2_latest

What it does (each step skipped when already done; running it again upgrades the code and keeps the settings):
1. installs nginx and python3-venv with apt-get if they are missing;
2. creates the system user ``medsam2`` (no login shell; home and state in /var/lib/medsam2);
3. copies this checkout's app, scripts and nginx rules to /opt/medsam2/src (the OHIF viewer with them, fetched by
   scripts/install_ohif.py if this checkout has none) and installs the pinned Python stack there with
   scripts/setup.sh (a virtual environment, about 8 GB; CPU or CUDA), unless ``--venv`` names one;
4. writes the settings, /etc/medsam2/medsam2.env (images, weights, replicas, TLS, login; the options below, else
   the file's values from an earlier install, else the defaults), the service /etc/systemd/system/medsam2.service
   and the nginx site /etc/nginx/sites-available/medsam2.conf (enabled);
5. checks nginx's configuration, enables and starts the service, reloads nginx (not with ``--no-start``).

``--prefix DIR`` puts every path above under DIR (for a try-out or a test: nothing outside DIR is touched, no
apt-get, and nothing is started unless asked). Runs on the system's python3 (no packages needed).
See docs/operations.md#install-as-a-service.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
COPIED = ("apps", "scripts", "deploy", "docs", "requirements.txt", "requirements-dev.txt", "pyproject.toml")
SKIPPED = ("__pycache__", "*.pyc", "logs", "*.pt", "*.part", "node_modules", ".viewer-*", "training.lock")
SETTINGS_NAME = "medsam2.env"

# the settings file's keys, in order: (key, default, comment). {state} is the state folder.
SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("MEDSAM2_STUDIES", "{state}/studies",
     "Images: a PACS's DICOMweb URL (https://pacs.example/dicom-web) or a folder of images"),
    ("MEDSAM2_CHECKPOINT", "MedSAM2_latest",
     "Weights: a checkpoint file, a name (downloaded once into the app's model folder) or random (development)"),
    ("MEDSAM2_REPLICAS", "1",
     "Server processes on this machine (nginx spreads the images over them): one per GPU, or per 4 CPU annotators"),
    ("MEDSAM2_REPLICA_PORT", "8001",
     "The first replica's port on 127.0.0.1 (the next ones follow); nginx is the only way in"),
    ("MEDSAM2_SERVER_NAME", "", "The server's name in viewers' URLs and in the TLS certificate"),
    ("MEDSAM2_TLS_CERT", "", "TLS certificate (PEM, with its chain) and key, read by nginx (as root)"),
    ("MEDSAM2_TLS_KEY", "", ""),
    ("MEDSAM2_HTTPS_PORT", "443", "Ports nginx listens on: HTTPS, and HTTP (which only redirects to HTTPS)"),
    ("MEDSAM2_HTTP_PORT", "80", ""),
    ("MEDSAM2_MAX_UPLOAD", "4g",
     "Largest request nginx accepts (an image or label upload; nginx's size syntax); larger ones get a JSON 413"),
    ("MONAI_LABEL_AUTH_ENABLE", "false",
     "Login (docs/security.md): true requires a token on every request; the identity provider's settings below"),
    ("MEDSAM2_CONF", "--conf finetuned_checkpoint {state}/model/medsam2_finetuned.pt",
     "More app settings (docs/configuration.md) as --conf key value ...; fine-tuned weights in the state folder"),
    ("MEDSAM2_FRONT", "none",
     "Set by the installer: the system's nginx is the front; the replicas' logs and pids are in MEDSAM2_RUN_DIR"),
    ("MEDSAM2_RUN_DIR", "{state}/run", ""),
)  # fmt: skip
FIXED = {"MEDSAM2_FRONT", "MEDSAM2_RUN_DIR"}


@dataclass(frozen=True)
class Layout:
    """Where an install puts things (under ``prefix``, ``/`` on a server)."""

    prefix: Path

    def path(self, absolute: str) -> Path:
        return self.prefix / absolute.lstrip("/")

    @property
    def src(self) -> Path:
        return self.path("/opt/medsam2/src")

    @property
    def state(self) -> Path:
        return self.path("/var/lib/medsam2")

    @property
    def settings(self) -> Path:
        return self.path("/etc/medsam2") / SETTINGS_NAME

    @property
    def unit(self) -> Path:
        return self.path("/etc/systemd/system/medsam2.service")

    @property
    def site(self) -> Path:
        return self.path("/etc/nginx/sites-available/medsam2.conf")

    @property
    def site_enabled(self) -> Path:
        return self.path("/etc/nginx/sites-enabled/medsam2.conf")

    @property
    def nginx_logs(self) -> Path:
        return self.path("/var/log/nginx")


def say(message: str) -> None:
    print(f"install_server: {message}", flush=True)


def fail(message: str) -> None:
    print(f"install_server: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run(cmd: list[str], **kw) -> None:
    say("$ " + shlex.join(cmd))
    result = subprocess.run(cmd, **kw)
    if result.returncode != 0:
        fail(f"{shlex.join(cmd)} failed with status {result.returncode}")


def read_settings(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a settings file (``#`` comments; values may be quoted), in order."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.removeprefix("export ").strip()] = value
    return values


def quote(value: str) -> str:
    """A value as python-dotenv reads it back unchanged (single quotes: no escapes inside)."""
    if value and all(c.isalnum() or c in "-_./:@,+" for c in value):
        return value
    if "'" in value:
        fail(f"a setting cannot hold a single quote: {value!r}")
    return f"'{value}'"


def settings_text(values: dict[str, str]) -> str:
    """The settings file: the known keys with their comments, then any other key an earlier file had."""
    lines = [
        "# Settings of the MedSAM2 server (docs/operations.md#settings). After a change run the installer again",
        "# (it keeps this file, renders nginx's site from it and restarts the service):",
        "#   sudo python3 /opt/medsam2/src/scripts/install_server.py",
        "# The replicas read MEDSAM2_* and MONAI Label's own MONAI_LABEL_* settings from here at every start.",
    ]
    for key, _, comment in SETTINGS:
        if comment:
            lines += ["", f"# {comment}"]
        lines.append(f"{key}={quote(values[key])}")
    others = [k for k in values if k not in {key for key, _, _ in SETTINGS}]
    if others:
        lines += ["", "# Other settings (e.g. the identity provider's: docs/security.md)"]
        lines += [f"{key}={quote(values[key])}" for key in others]
    return "\n".join(lines) + "\n"


def merge_settings(layout: Layout, earlier: dict[str, str], given: dict[str, str]) -> dict[str, str]:
    """Defaults < the earlier file < the options given; the fixed keys always as the installer wants them."""
    state = str(Path("/var/lib/medsam2") if layout.prefix == Path("/") else layout.state)
    defaults = {key: default.format(state=state) for key, default, _ in SETTINGS}
    values = {**defaults, **earlier, **{k: v for k, v in given.items() if v is not None}}
    values.update({k: defaults[k] for k in FIXED})
    if not values["MEDSAM2_SERVER_NAME"]:
        values["MEDSAM2_SERVER_NAME"] = socket.getfqdn()
    return values


def check_settings(values: dict[str, str]) -> None:
    """Stop with one line for a setting nginx or the service could not use."""
    for key in ("MEDSAM2_TLS_CERT", "MEDSAM2_TLS_KEY"):
        if not values[key]:
            fail(f"{key} is not set: give --tls-cert and --tls-key (PEM files; the hospital's certificate)")
        if not Path(values[key]).is_file():
            fail(f"{key}: {values[key]} does not exist")
    for key in ("MEDSAM2_REPLICAS", "MEDSAM2_REPLICA_PORT", "MEDSAM2_HTTPS_PORT", "MEDSAM2_HTTP_PORT"):
        if not values[key].isdigit() or int(values[key]) < 1:
            fail(f"{key} must be a positive whole number, not {values[key]!r}")
    studies = values["MEDSAM2_STUDIES"]
    if not studies.startswith(("http://", "https://")) and not Path(studies).is_dir():
        fail(f"MEDSAM2_STUDIES: {studies} is neither a DICOMweb URL nor an existing folder")


def copy_source(layout: Layout) -> None:
    """This checkout's files into ``src`` (a fresh copy, swapped in whole; the virtual environment is kept)."""
    new = layout.src.with_name("src.new")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for name in COPIED:
        source = SOURCE / name
        if source.is_dir():
            shutil.copytree(source, new / name, ignore=shutil.ignore_patterns(*SKIPPED), symlinks=False)
        elif source.is_file():
            shutil.copy2(source, new / name)
    old_venv = layout.src / ".venv"
    if old_venv.is_symlink() or old_venv.is_dir():
        old_venv.rename(new / ".venv")
    if layout.src.exists():
        shutil.rmtree(layout.src)
    new.rename(layout.src)
    say(f"copied the app to {layout.src}")


def install_python(layout: Layout, venv: str | None) -> Path:
    """The venv's python: ``venv`` (linked as src/.venv) or one made by scripts/setup.sh."""
    target = layout.src / ".venv"
    if venv:
        if not (Path(venv) / "bin" / "python").exists():
            fail(f"--venv {venv} has no bin/python")
        if target.is_symlink() or target.exists():
            target.unlink() if target.is_symlink() else shutil.rmtree(target)
        target.symlink_to(Path(venv).resolve())
    else:
        run(["bash", str(layout.src / "scripts" / "setup.sh")], cwd=layout.src)
    if not (layout.src / "apps" / "medsam2" / "ohif" / "viewer").is_dir():
        run([str(target / "bin" / "python"), str(layout.src / "scripts" / "install_ohif.py")])
    return target / "bin" / "python"


def render(template: str, values: dict[str, str]) -> str:
    text = (SOURCE / "deploy" / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        fail(f"deploy/{template}: a placeholder was left: {text[text.index('@@') :][:40]}")
    return text


def nginx_site(layout: Layout, values: dict[str, str]) -> str:
    """The nginx site from the settings (replicas, TLS, ports, upload limit)."""
    first, count = int(values["MEDSAM2_REPLICA_PORT"]), int(values["MEDSAM2_REPLICAS"])
    servers = "\n".join(f"    server 127.0.0.1:{first + i} max_fails=1 fail_timeout=10s;" for i in range(count))
    https_port = values["MEDSAM2_HTTPS_PORT"]
    rules = layout.src / "deploy" / "nginx"
    return render(
        "nginx/medsam2-site.conf",
        {
            "MAPS": str(rules / "medsam2-maps.conf"),
            "PROXY_RULES": str(rules / "medsam2-proxy.conf"),
            "SERVERS": servers,
            "SERVER_NAME": values["MEDSAM2_SERVER_NAME"],
            "HTTP_PORT": values["MEDSAM2_HTTP_PORT"],
            "HTTPS_PORT": https_port,
            "HTTPS_PORT_SUFFIX": "" if https_port == "443" else f":{https_port}",
            "TLS_CERT": values["MEDSAM2_TLS_CERT"],
            "TLS_KEY": values["MEDSAM2_TLS_KEY"],
            "MAX_UPLOAD": values["MEDSAM2_MAX_UPLOAD"],
            "LOG_DIR": str(layout.nginx_logs),
        },
    )


def service_unit(layout: Layout, user: str, python: Path) -> str:
    """The systemd unit: the launcher as ``user``, reading the settings file."""
    group = pwd.getpwnam(user).pw_gid
    return render(
        "systemd/medsam2.service",
        {
            "USER": user,
            "GROUP": grp.getgrgid(group).gr_name,
            "SRC": str(layout.src),
            "STATE_DIR": str(layout.state),
            "PYTHON": str(python),
            "SETTINGS": str(layout.settings),
        },
    )


def ensure_packages() -> None:
    """nginx and python3-venv from apt when missing (Debian and Ubuntu)."""
    missing = [] if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else ["nginx"]
    if subprocess.run([sys.executable, "-c", "import ensurepip, venv"], capture_output=True).returncode != 0:
        missing.append("python3-venv")
    if not missing:
        return
    if not shutil.which("apt-get"):
        fail(f"install {' '.join(missing)} first (this installer knows apt-get only: Debian and Ubuntu)")
    run(["apt-get", "update", "-q"])
    run(["apt-get", "install", "-y", "-q", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ensure_user(user: str, layout: Layout, on_system: bool) -> None:
    """The system user the service runs as (created once, no login shell; under --prefix it must exist)."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        if not on_system:
            fail(f"the user {user} does not exist: with --prefix, give an existing --user (nothing is created)")
        home = ["--home-dir", str(layout.state), "--shell", "/usr/sbin/nologin"]
        run(["useradd", "--system", "--user-group", *home, user])


def prepare_folders(layout: Layout, user: str, values: dict[str, str]) -> None:
    """State, logs and the app's model folder, writable by the service's user; the code stays root's."""
    writable = [layout.state, layout.state / "model", Path(values["MEDSAM2_RUN_DIR"])]
    writable += [layout.src / "apps" / "medsam2" / "logs", layout.src / "apps" / "medsam2" / "model"]
    studies = values["MEDSAM2_STUDIES"]
    if not studies.startswith(("http://", "https://")):
        writable.append(Path(studies))
    made = [layout.nginx_logs, layout.settings.parent, layout.site_enabled.parent, layout.unit.parent]
    for folder in [*writable, *made]:
        folder.mkdir(parents=True, exist_ok=True)
    entry = pwd.getpwnam(user)
    for folder in writable:
        shutil.chown(folder, entry.pw_uid, entry.pw_gid)


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    say(f"wrote {path}")


def enable_site(layout: Layout) -> None:
    if layout.site_enabled.is_symlink() or layout.site_enabled.exists():
        layout.site_enabled.unlink()
    layout.site_enabled.symlink_to(layout.site)


def start(layout: Layout) -> None:
    """Check nginx's configuration, (re)start the service, reload nginx."""
    run(["nginx", "-t", "-q"])
    run(["systemctl", "daemon-reload"])
    run(["systemctl", "enable", "medsam2.service"])
    run(["systemctl", "restart", "medsam2.service"])
    run(["systemctl", "reload-or-restart", "nginx.service"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--prefix", default="/", help="install under this folder instead of / (a try-out, the tests)")
    add("--user", default="medsam2", help="the system user the service runs as (created if missing)")
    add("--venv", help="use this existing virtual environment (with the pinned stack) instead of making one")
    add("--no-start", action="store_true", help="write everything, start nothing (no systemctl, no nginx reload)")
    add("--studies", help="a PACS's DICOMweb URL or a folder [MEDSAM2_STUDIES]")
    add("--checkpoint", help="the weights: a file, a name, or random [MEDSAM2_CHECKPOINT]")
    add("--replicas", help="server processes on this machine [MEDSAM2_REPLICAS]")
    add("--replica-port", help="the first replica's port on 127.0.0.1 [MEDSAM2_REPLICA_PORT]")
    add("--server-name", help="the server's DNS name [MEDSAM2_SERVER_NAME]")
    add("--tls-cert", help="TLS certificate, PEM [MEDSAM2_TLS_CERT]")
    add("--tls-key", help="TLS private key, PEM [MEDSAM2_TLS_KEY]")
    add("--https-port", help="[MEDSAM2_HTTPS_PORT]")
    add("--http-port", help="[MEDSAM2_HTTP_PORT]")
    add("--max-upload", help="largest request, e.g. 4g or 500m [MEDSAM2_MAX_UPLOAD]")
    add("--login", choices=("on", "off"), help="require a login token (docs/security.md) [MONAI_LABEL_AUTH_ENABLE]")
    add("--setting", action="append", default=[], metavar="KEY=VALUE", help="any other setting, e.g. the "
        "identity provider's MONAI_LABEL_AUTH_* or MEDSAM2_CONF (repeat for several)")  # fmt: skip
    return parser.parse_args(argv)


def given_settings(args: argparse.Namespace) -> dict[str, str | None]:
    given: dict[str, str | None] = {
        "MEDSAM2_STUDIES": args.studies,
        "MEDSAM2_CHECKPOINT": args.checkpoint,
        "MEDSAM2_REPLICAS": args.replicas,
        "MEDSAM2_REPLICA_PORT": args.replica_port,
        "MEDSAM2_SERVER_NAME": args.server_name,
        "MEDSAM2_TLS_CERT": args.tls_cert and str(Path(args.tls_cert).resolve()),
        "MEDSAM2_TLS_KEY": args.tls_key and str(Path(args.tls_key).resolve()),
        "MEDSAM2_HTTPS_PORT": args.https_port,
        "MEDSAM2_HTTP_PORT": args.http_port,
        "MEDSAM2_MAX_UPLOAD": args.max_upload,
        "MONAI_LABEL_AUTH_ENABLE": {"on": "true", "off": "false", None: None}[args.login],
    }
    for item in args.setting:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "").isalnum():
            fail(f"--setting {item!r}: write KEY=VALUE")
        given[key] = value
    return given


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    layout = Layout(Path(args.prefix).resolve())
    on_system = layout.prefix == Path("/")
    if on_system and os.geteuid() != 0:
        fail("run it as root (sudo): it installs packages, a system user and a service")
    values = merge_settings(layout, read_settings(layout.settings), given_settings(args))
    check_settings(values)
    if on_system:
        ensure_packages()
    ensure_user(args.user, layout, on_system)
    copy_source(layout)
    python = install_python(layout, args.venv)
    prepare_folders(layout, args.user, values)
    write(layout.settings, settings_text(values), mode=0o640)
    shutil.chown(layout.settings, "root" if on_system else None, pwd.getpwnam(args.user).pw_gid)
    write(layout.unit, service_unit(layout, args.user, python))
    write(layout.site, nginx_site(layout, values))
    enable_site(layout)
    url = f"https://{values['MEDSAM2_SERVER_NAME']}" + (
        "" if values["MEDSAM2_HTTPS_PORT"] == "443" else f":{values['MEDSAM2_HTTPS_PORT']}"
    )
    if args.no_start:
        say(f"installed in {layout.prefix}, not started (--no-start); the service runs: {service_command(layout)}")
        return
    start(layout)
    say(f"started: viewers open {url}/ohif/ ; logs: journalctl -u medsam2, {values['MEDSAM2_RUN_DIR']}")


def service_command(layout: Layout) -> str:
    """The service's command line (its ExecStart)."""
    for line in layout.unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=")
    raise AssertionError(f"{layout.unit} has no ExecStart")


if __name__ == "__main__":
    main()
