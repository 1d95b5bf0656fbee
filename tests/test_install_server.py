"""The production install (scripts/install_server.py) end to end on this machine: installed into a clean folder
(``--prefix``, ``--no-start``: there is no systemd here), the service's own command line (the unit's ExecStart)
started by the test, a real nginx with the installed site and a self-signed certificate (openssl) in front, login
on (an OpenID Connect provider started here, tests/test_auth.py's, and an API key file), then over HTTPS: HTTP
redirected, the OHIF viewer and the MedSAM2 panel from the same origin, nothing else without credentials, a too
large request refused with a JSON 413, MONAI Label's own client logged in (info, infer and
``train_start(model, {"max_epochs": 1})``) and the 3D Slicer plugin's requests with an API key.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from pacs_testing import require
from test_auth import ADMIN, ALL_ROLES, ANNOTATOR, CLIENT_ID, PASSWORDS, USER, LocalIdentityProvider
from test_crash_safety import publishing_setup
from test_replicas import BOX_3D, collect_lines, two_free_ports

from conftest import REPO, free_port

sys.path.insert(0, str(REPO / "scripts"))
from install_server import Layout, read_settings, service_command  # noqa: E402
from replicas import nginx_binary  # noqa: E402

from lib.server.api_keys import add_key  # noqa: E402

pytestmark = pytest.mark.server  # the installed service starts `monailabel start_server`
ME = pwd.getpwuid(os.getuid()).pw_name  # the service's user: under --prefix an existing one (no useradd)
TINY_RUN = {"steps_per_epoch": 1, "clip_length": 3, "max_objects": 1, "publish_max_overlap_rise": 1.0}


@dataclass
class Installed:
    url: str  # https://localhost:<port>
    http_url: str
    cert: Path
    layout: Layout
    output: list[str]
    idp: LocalIdentityProvider
    api_key: str  # an annotator's, as the 3D Slicer plugin sends it (X-API-Key)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 and its key (openssl, P-256: made in milliseconds)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    cmd += ["-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run([*cmd, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def nginx_main_conf(folder: Path, layout: Layout) -> Path:
    """What Debian's /etc/nginx/nginx.conf does for the site: include sites-enabled (pid, logs, temp in ``folder``)."""
    conf = folder / "nginx.conf"
    temp = "\n".join(
        f"    {kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(
        # workers as this user, as Debian's run as www-data (as root, nginx would run them as nobody, which cannot
        # write the proxy's temp files under this test's folder: a large answer, OHIF's bundle, would be cut short)
        f"user {ME};\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n{temp}\n"
        f"    include {layout.path('/etc/nginx/sites-enabled')}/*;\n}}\n"
    )
    return conf


@pytest.fixture(scope="module")
def idp():
    provider = LocalIdentityProvider()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def installed(tmp_path_factory, idp):
    root = tmp_path_factory.mktemp("install")
    studies, conf, _ = publishing_setup(root, images=3, labelled=2)
    app_conf = {k: v for k, v in conf.items() if k not in ("checkpoint", "finetuned_checkpoint")}
    with running_install(root, idp, str(studies), conf["checkpoint"], app_conf) as installed:
        yield installed


@contextmanager
def running_install(
    root: Path, idp, studies: str, checkpoint: str, app_conf: dict[str, str], max_upload: str = "1m"
) -> Iterator[Installed]:
    """``scripts/install_server.py`` into ``root/server`` (images or PACS ``studies``, login on at ``idp``, TLS with
    a self-signed certificate, an annotator's API key, ``app_conf`` as ``--conf`` settings, nginx's request limit
    ``max_upload``), the service's command line started and nginx with the installed site in front; stopped on exit
    (the service must exit cleanly)."""
    require([nginx_binary(), shutil.which("openssl") or "/usr/bin/openssl"], "nginx and openssl (Debian packages)")
    cert, key = self_signed_certificate(root)
    keys_file = root / "api_keys.json"
    _, api_key = add_key(keys_file, "slicer-ws3", "annotator")
    https_port, http_port, replica_port = free_port(), free_port(), two_free_ports()
    app_conf = {**app_conf, "cpu_encoder": "torch", "warm_up": "off", "api_keys_file": str(keys_file)}
    conf_line = " ".join(f"--conf {k} {v}" for k, v in app_conf.items())
    cmd = ["/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable]  # the system's python
    cmd += [str(REPO / "scripts" / "install_server.py"), "--prefix", str(root / "server"), "--no-start"]
    cmd += ["--user", ME, "--venv", str(Path(sys.executable).parents[1]), "--server-name", "localhost"]
    cmd += ["--tls-cert", str(cert), "--tls-key", str(key), "--https-port", str(https_port)]
    cmd += ["--http-port", str(http_port), "--replica-port", str(replica_port), "--max-upload", max_upload]
    cmd += ["--studies", studies, "--checkpoint", checkpoint, "--login", "on"]
    cmd += ["--setting", f"MEDSAM2_CONF={conf_line}", "--setting", f"MONAI_LABEL_AUTH_REALM_URI={idp.realm_uri}"]
    cmd += ["--setting", f"MONAI_LABEL_AUTH_CLIENT_ID={CLIENT_ID}"]
    installing = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert installing.returncode == 0, installing.stdout + installing.stderr
    layout = Layout(root / "server")
    # the service as systemd would run it, as far as this sandbox allows: its command line, in its folder
    service = subprocess.Popen(
        shlex.split(service_command(layout)),
        cwd=layout.state,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    threading.Thread(target=collect_lines, args=(service.stdout, output), daemon=True).start()
    nginx_dir = root / "nginx"
    nginx_dir.mkdir()
    nginx = None
    try:
        main_conf = nginx_main_conf(nginx_dir, layout)
        run_nginx = [nginx_binary(), "-p", str(nginx_dir), "-c", str(main_conf)]
        check = subprocess.run([*run_nginx, "-t", "-q"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        nginx = subprocess.Popen([*run_nginx, "-g", "daemon off;"])
        deadline = time.time() + 300
        while not any("1 replicas on ports" in line for line in output):
            assert service.poll() is None and time.time() < deadline, "".join(output)
            time.sleep(0.5)
        urls = f"https://localhost:{https_port}", f"http://localhost:{http_port}"
        yield Installed(*urls, cert, layout, output, idp, api_key)
    finally:
        service.terminate()
        assert service.wait(timeout=90) == 0, "".join(output)
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=30)


def test_https_only_with_the_viewer_and_its_panel_on_the_same_origin(installed):
    redirect = requests.get(f"{installed.http_url}/ohif/?x=1", allow_redirects=False, timeout=30)
    assert redirect.status_code == 301 and redirect.headers["location"] == f"{installed.url}/ohif/?x=1"
    viewer = requests.get(f"{installed.url}/ohif/", verify=str(installed.cert), timeout=60)
    assert viewer.status_code == 200 and "<html" in viewer.text.lower(), viewer.text[:300]
    for path in ("/ohif/app-config.js", "/ohif/medsam2-ohif.js", "/ohif/medsam2-mode.js"):
        r = requests.get(installed.url + path, verify=str(installed.cert), timeout=60)
        assert r.status_code == 200, (path, r.status_code)
    config = requests.get(f"{installed.url}/ohif/app-config.js", verify=str(installed.cert), timeout=60).text
    assert "wadoRoot: '/proxy/dicom/wado'" in config  # the panel and DICOMweb: relative URLs, the same origin


def test_a_request_over_the_size_limit_is_refused_with_a_json_413(installed):
    r = requests.put(
        f"{installed.url}/datastore/label",
        params={"image": "case0", "tag": "final"},
        files={"label": ("case0.nii.gz", b"\0" * (3 * 1024 * 1024))},
        verify=str(installed.cert),
        timeout=60,
    )
    assert r.status_code == 413 and "smaller" in r.json()["detail"], r.text[:300]


def test_nothing_but_the_viewer_and_login_is_served_without_credentials(installed):
    for path in ("/info/", "/datastore/?output=all", "/medsam2/labels/case0"):
        r = requests.get(installed.url + path, verify=str(installed.cert), timeout=60)
        assert r.status_code == 401 and r.json()["detail"], (path, r.status_code, r.text[:300])
    wrong_key = requests.get(
        installed.url + "/info/", headers={"X-API-Key": "msk_nope"}, verify=str(installed.cert), timeout=60
    )
    assert wrong_key.status_code == 401 and "API key" in wrong_key.json()["detail"], wrong_key.text[:300]
    about = requests.get(installed.url + "/auth/", verify=str(installed.cert), timeout=60).json()
    assert about == {"enabled": True, "client_id": CLIENT_ID, "realm": installed.idp.realm_uri}


def client_with(installed: Installed, token: dict, tmp_path: Path) -> MONAILabelClient:
    """MONAI Label's client with a token. A new one per call: 0.8.5's client writes each POST's Content-Type and
    Content-Length into the headers it keeps for the token, so its next GET would announce a body it never sends
    (docs/security.md#clients)."""
    client = MONAILabelClient(installed.url, tmpdir=str(tmp_path), client_id="install-test")
    client.update_auth(token)
    return client


def roles_of_token(installed: Installed, token: dict) -> set[str]:
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    valid = requests.get(installed.url + "/auth/token/valid", headers=headers, verify=str(installed.cert), timeout=60)
    assert valid.status_code == 200, valid.text[:300]
    return set(valid.json()["roles"])


def test_monailabel_client_logs_in_infers_and_trains_over_https(installed, tmp_path):
    anonymous = MONAILabelClient(installed.url, tmpdir=str(tmp_path), client_id="install-test")
    assert anonymous.auth_enabled()
    alice = anonymous.auth_token("alice", PASSWORDS["alice"])  # the password grant, through the server
    assert roles_of_token(installed, alice) == {USER, ANNOTATOR}
    info = client_with(installed, alice, tmp_path).info()
    assert "medsam2_3d" in info["models"] and info["replica"] == "replica-1"
    label, result = client_with(installed, alice, tmp_path).infer("medsam2_3d", "case0", BOX_3D)
    assert Path(label).is_file() and Path(label).stat().st_size > 0, result
    with pytest.raises(MONAILabelClientException) as refused:  # training needs an admin
        client_with(installed, alice, tmp_path).train_start("medsam2", {"max_epochs": 1, **TINY_RUN})
    assert "Status: 403" in refused.value.msg, refused.value.msg
    admin = {"token_type": "Bearer", "access_token": installed.idp.token(roles=ALL_ROLES)}
    assert ADMIN in roles_of_token(installed, admin)
    # MONAI Label's documented option name (its clients send max_epochs), the rest only to keep it short
    started = client_with(installed, admin, tmp_path).train_start("medsam2", {"max_epochs": 1, **TINY_RUN})
    assert started.get("status") in ("RUNNING", "SUBMITTED", None) or started, started
    deadline = time.time() + 300
    while (status := client_with(installed, admin, tmp_path).train_status())["status"] not in ("DONE", "ERROR"):
        assert time.time() < deadline, status
        time.sleep(2)
    assert status["status"] == "DONE", json.dumps(status)[:2000]


def test_the_slicer_plugins_requests_with_an_api_key(installed, tmp_path):
    """What the plugin sends for a 3D answer and a save (its client's multipart forms), with the key's header."""
    headers = {"X-API-Key": installed.api_key}
    verify = str(installed.cert)
    answer = requests.post(
        installed.url + "/infer/medsam2_3d?image=case1&output=image",
        data={"params": json.dumps({**BOX_3D, "client_id": "slicer-ws3"})},
        headers=headers,
        verify=verify,
        timeout=300,
    )
    assert answer.status_code == 200 and answer.content, answer.text[:300]
    label = tmp_path / "case1.nii.gz"
    label.write_bytes(answer.content)
    with open(label, "rb") as f:
        saved = requests.put(
            installed.url + "/datastore/label?image=case1&tag=final",
            data={"params": json.dumps({"label_info": [{"name": "lesion", "idx": 1}]})},
            files={"label": ("case1.nii.gz", f)},
            headers=headers,
            verify=verify,
            timeout=120,
        )
    assert saved.status_code == 200, saved.text[:300]
    listed = requests.get(installed.url + "/datastore/?output=all", headers=headers, verify=verify, timeout=60)
    assert "final" in listed.json()["objects"]["case1"]["labels"], listed.text[:500]


def test_the_install_writes_its_settings_in_one_file(installed):
    settings = read_settings(installed.layout.settings)
    assert settings["MEDSAM2_TLS_CERT"] == str(installed.cert) and settings["MONAI_LABEL_AUTH_ENABLE"] == "true"
    assert settings["MEDSAM2_FRONT"] == "none" and settings["MEDSAM2_MAX_UPLOAD"] == "1m"
    assert (installed.layout.src / "apps" / "medsam2" / "main.py").is_file()
    unit = installed.layout.unit.read_text()
    assert f"User={ME}" in unit and f"--env-file {installed.layout.settings}" in unit
    # running it again (an upgrade; last in this module: it swaps the code the running service was started from,
    # which a real install then restarts) keeps the settings: a key given once stays, a new option changes its key
    again = [sys.executable, str(REPO / "scripts" / "install_server.py"), "--prefix", str(installed.layout.prefix)]
    again += ["--no-start", "--user", ME, "--venv", str(Path(sys.executable).parents[1])]
    done = subprocess.run(
        [*again, "--max-upload", "2m", "--setting", "MONAI_LABEL_AUTH_TIMEOUT=10"], capture_output=True
    )
    assert done.returncode == 0, done.stderr
    after = read_settings(installed.layout.settings)
    assert after == {**settings, "MEDSAM2_MAX_UPLOAD": "2m", "MONAI_LABEL_AUTH_TIMEOUT": "10"}
    assert "client_max_body_size 2m;" in installed.layout.site.read_text()
