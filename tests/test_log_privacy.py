"""No patient identifiers in log lines: the scrubber on every form an identifier takes in MONAI Label's and the
app's log lines, the formatter on every handler of MONAI Label's logging.json, and the real server next to a
real PACS (Orthanc) with a series whose PatientID and PatientName are known."""

from __future__ import annotations

import io
import json
import logging
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
from pacs_testing import Orthanc, lung_ct, write_ct_series

from conftest import REPO, start_server, stop_server
from lib import log_identifiers
from lib.log_identifiers import (
    forget_identifiers,
    identifier_words,
    identifying_values,
    pseudonym,
    remember_identifiers,
    scrub,
    set_key,
)
from lib.server.log_privacy import KEY_FILE, PrivateFormatter, installation_key
from lib.server.request_context import reset_request_id, set_request_id
from sam2_testing import APP_DIR, small_config_file

KEY = bytes(range(32))
PID, NAME = "MRN-0047113", "Doe^John"
SERIES = "1.2.826.0.1.3680043.8.498.10475291311"


@pytest.fixture(autouse=True)
def fixed_key():
    """A known key, and no values remembered by another test."""
    before = log_identifiers._key
    set_key(KEY)
    forget_identifiers()
    yield
    forget_identifiers()
    set_key(before)


def p(value: str) -> str:
    return pseudonym(value, KEY)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (  # MONAI Label's "Next sample" (a Python dict)
            f"Next sample: {{'id': '{SERIES}', 'PatientID': '{PID}', 'StudyDate': '20200101'}}",
            f"Next sample: {{'id': '{SERIES}', 'PatientID': '{p(PID)}', 'StudyDate': '20200101'}}",
        ),
        (f'{{"PatientName": "{NAME}", "n": 3}}', f'{{"PatientName": "{p(NAME)}", "n": 3}}'),
        (f"PatientID={PID} patient_id={PID}&x=1", f"PatientID={p(PID)} patient_id={p(PID)}&x=1"),
        ("PatientBirthDate: 19700101, Rows: 512", f"PatientBirthDate: {p('19700101')}, Rows: 512"),
        (f"OtherPatientIDs=['{PID}', 'B-2']", f"OtherPatientIDs=['{p(PID)}', '{p('B-2')}']"),
        ("PatientAddress='1 Main St, Springfield' ok", f"PatientAddress='{p('1 Main St, Springfield')}' ok"),
        (  # DICOMweb JSON: an LO and a PN, by tag
            f'"00100020": {{"vr": "LO", "Value": ["{PID}"]}}, "00100010": {{"vr": "PN", "Value": '
            f'[{{"Alphabetic": "{NAME}"}}]}}, "0020000E": {{"vr": "UI", "Value": ["{SERIES}"]}}',
            f'"00100020": {{"vr": "LO", "Value": ["{p(PID)}"]}}, "00100010": {{"vr": "PN", "Value": '
            f'[{{"Alphabetic": "{p(NAME)}"}}]}}, "0020000E": {{"vr": "UI", "Value": ["{SERIES}"]}}',
        ),
        (  # the other tags
            '"00100030": {"vr": "DA", "Value": ["19700101"]} "00101000": {"vr": "LO", "Value": ["X1", "X2"]} '
            '"00101040": {"vr": "LO", "Value": ["Elm Road 5"]}',
            f'"00100030": {{"vr": "DA", "Value": ["{p("19700101")}"]}} "00101000": {{"vr": "LO", "Value": '
            f'["{p("X1")}", "{p("X2")}"]}} "00101040": {{"vr": "LO", "Value": ["{p("Elm Road 5")}"]}}',
        ),
        (  # a person name object of any attribute
            '{"ReferringPhysicianName": [{"Alphabetic": "Roe^Jane", "Ideographic": "X"}]}',
            f'{{"ReferringPhysicianName": [{{"Alphabetic": "{p("Roe^Jane")}", "Ideographic": "{p("X")}"}}]}}',
        ),
        (  # pydicom's element repr, and a tag with ':'
            f"(0010,0010) Patient's Name      PN: '{NAME}' (0010, 0020) Patient ID   LO: '{PID}'",
            f"(0010,0010) Patient's Name      PN: '{p(NAME)}' (0010, 0020) Patient ID   LO: '{p(PID)}'",
        ),
        (f"(0010,0020): {PID}", f"(0010,0020): {p(PID)}"),
    ],
)
def test_every_form_of_an_identifying_attribute_is_replaced(line: str, expected: str) -> None:
    assert scrub(line) == expected
    assert scrub(expected) == expected  # a pseudonym is left alone


def test_nothing_else_changes() -> None:
    remember_identifiers([PID, NAME])
    lines = [
        f"Next sample: {{'id': '{SERIES}', 'StudyInstanceUID': '1.2.3.4', 'Modality': 'CT', 'n': 47113}}",
        "POST /infer/medsam2_2d?image=lung2 200 in 1.5 s; 12 slices, 512x512, label lesion=1",
        "IssuerOfPatientID: HOSP-A; PatientSex=M; the patient's series (0020,000E): 1.2.3",
        'PatientID: null, PatientName="" UNK PatientID=UNK',
        "[2024-01-01 10:00:00,123] [1234] [MainThread] [INFO] (lib.x:12) - done: johnny doest 0047113",
    ]
    for line in lines:
        assert scrub(line) == line


def test_remembered_values_are_replaced_wherever_they_appear() -> None:
    remember_identifiers(identifying_values({"PatientID": PID, "PatientName": NAME, "StudyDate": "20200101"}))
    line = f"KeyError: '{PID.lower()}' in /cache/{PID}_ct.nii.gz for DOE, john ({NAME}) on 20200101"
    assert (
        scrub(line)
        == f"KeyError: '{p(PID)}' in /cache/{p(PID)}_ct.nii.gz for {p('DOE')}, {p('john')} ({p(NAME)}) on 20200101"
    )
    remember_identifiers(["123456"])  # a numeric id is not taken out of a dotted UID
    assert scrub("uid 1.2.840.123456.7 id 123456.") == f"uid 1.2.840.123456.7 id {p('123456')}."


def test_what_is_remembered_and_the_bound() -> None:
    assert identifier_words(" Doe^John^^Dr ") == ["Doe^John^^Dr", "Doe", "John"]
    assert identifier_words("AB") == [] and identifier_words("X" * 200) == []
    ds = pydicom.Dataset()
    ds.PatientID, ds.PatientName, ds.OtherPatientIDs = PID, NAME, ["OP-1", "OP-2"]
    ds.PatientBirthDate = "19700101"  # found by its key in a line, but not searched for as a word
    assert identifying_values(ds) == [NAME, PID, "OP-1", "OP-2"]
    registry = log_identifiers._Registry(limit=3)
    registry.add(["AAA1", "BBB2", "CCC3"])
    registry.add(["AAA1", "DDD4"])  # AAA1 used again: BBB2 is the oldest
    pattern = registry.pattern()
    assert pattern is not None and len(registry) == 3
    assert pattern.sub("-", "AAA1 BBB2 CCC3 DDD4") == "- BBB2 - -"


def test_pseudonyms_are_stable_and_distinct() -> None:
    assert p(PID) == p(f" {PID.lower()} ") == pseudonym(PID, KEY)
    assert p(PID) != p("MRN-0047114") and p(PID) != pseudonym(PID, bytes(32))
    assert log_identifiers.PSEUDONYM.fullmatch(p(PID))
    many = {p(f"MRN-{i}") for i in range(2000)}
    assert len(many) == 2000


def test_the_key_file_is_made_once_private_and_shared(tmp_path: Path) -> None:
    first = installation_key(tmp_path / "model")
    assert first is not None and len(first) == 32
    path = tmp_path / "model" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert installation_key(tmp_path / "model") == first  # another replica, a restart
    assert installation_key(tmp_path / "other") != first
    assert [f.name for f in path.parent.iterdir()] == [KEY_FILE]  # no temporary file left
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert installation_key(blocked / "model") is None and installation_key(None) is None


def formatted(record_args: tuple, exc: bool = False, fmt: str = "[%(levelname)s] (%(name)s) - %(message)s") -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrivateFormatter(logging.Formatter(fmt)))
    test_logger = logging.getLogger("medsam2.test_log_privacy")
    test_logger.propagate = False
    test_logger.addHandler(handler)
    try:
        if exc:
            try:
                raise LookupError(*record_args)
            except LookupError:
                test_logger.exception("lookup failed")
        else:
            test_logger.warning(*record_args)
    finally:
        test_logger.removeHandler(handler)
    return stream.getvalue()


def test_the_formatter_scrubs_messages_arguments_and_tracebacks() -> None:
    remember_identifiers([PID, NAME])
    text = formatted(("Next sample: %s", {"id": SERIES, "PatientID": PID}))
    assert (
        text == f"[WARNING] (medsam2.test_log_privacy) - Next sample: {{'id': '{SERIES}', 'PatientID': '{p(PID)}'}}\n"
    )
    text = formatted((f"no series for patient {PID} ({NAME})",), exc=True)
    assert "Traceback (most recent call last)" in text and "LookupError" in text
    assert PID not in text and "Doe" not in text and "John" not in text and p(PID) in text and p(NAME) in text


def test_the_request_id_follows_the_level() -> None:
    token = set_request_id("req-0123456789")
    try:
        assert formatted(("hello",)) == "[WARNING] [req=req-0123456789] (medsam2.test_log_privacy) - hello\n"
        assert formatted(("hello",), fmt="%(message)s") == "[req=req-0123456789] hello\n"
    finally:
        reset_request_id(token)
    assert formatted(("hello",), fmt="%(message)s") == "hello\n"


# MONAI Label's logging.json as the server loads it, then install(); lines on the loggers it configures.
LOGGING_JSON = """
import json, logging, logging.config, sys
from pathlib import Path
sys.path.insert(0, {app_dir!r})
import monailabel  # the package only: its __init__ is light
config = (Path(monailabel.__file__).parent / "logging.json").read_text().replace("${{LOGFILE}}", {log!r})
logging.config.dictConfig(json.loads(config))
from lib.server import log_privacy
from lib.log_identifiers import remember_identifiers
print("INSTALLED", log_privacy.install({key_folder!r}), log_privacy.is_installed())
remember_identifiers([{name!r}])
logging.getLogger("monailabel.endpoints.activelearning").info("Next sample: %s", {{"PatientID": {pid!r}}})
logging.getLogger("task_train").info("[train] epoch 1 on %s of patient {name}", "PatientID={pid}")
logging.getLogger("uvicorn.error").warning("from uvicorn: PatientName={name}")
"""


def test_every_handler_of_monailabels_logging_config_scrubs(tmp_path: Path) -> None:
    """Root (console + app.log), task_train (what the training subprocess prints), uvicorn: all scrubbed."""
    log = tmp_path / "app.log"
    code = LOGGING_JSON.format(app_dir=str(APP_DIR), log=str(log), key_folder=str(tmp_path), name=NAME, pid=PID)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert "INSTALLED True True" in done.stdout, done.stdout + done.stderr
    key = installation_key(tmp_path)
    assert key is not None
    console, written = done.stderr, log.read_text()
    for text in (console, written):
        assert pseudonym(PID, key) in text and pseudonym(NAME, key) in text
        assert "MRN" not in text and "Doe" not in text and "John" not in text
    assert "[train] epoch 1" in written and "[train] epoch 1" in console
    assert "from uvicorn" in console


# ----- the real server next to a real PACS -----------------------------------------------------------------------
E2E_PID, E2E_NAME = "QZX-PRIV-48213", "Vorquandt^Elspethine^Maribel"


def _set_patient_name(files: list[Path], name: str) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName = name
        ds.save_as(path)


@pytest.fixture(scope="module")
def private_pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("private_pacs")
    orthanc = Orthanc(folder / "orthanc").start()
    series = write_ct_series(lung_ct(first_slice=30, num_slices=8), folder / "ct", patient_id=E2E_PID)
    _set_patient_name(series.files, E2E_NAME)
    orthanc.upload(series.files)
    yield orthanc, series
    orthanc.stop()


@pytest.fixture(scope="module")
def private_server(private_pacs, random_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("private_server")
    conf = {
        "checkpoint": str(random_checkpoint),
        "model_config": str(small_config_file(folder)),
        "window": "lung",
        "dicomweb_timeout_s": "10",
    }
    env = {"MONAI_LABEL_DATASTORE_CACHE_PATH": str(folder / "cache")}
    server = start_server(private_pacs[0].dicomweb, conf, folder / "server.log", env=env)  # type: ignore[arg-type]
    yield server
    stop_server(server)


def leaks(text: str) -> list[str]:
    words = [E2E_PID, E2E_NAME, *E2E_NAME.split("^"), " ".join(E2E_NAME.split("^"))]
    return [w for w in words if w.lower() in text.lower()]


def test_the_servers_logs_name_no_patient(private_pacs, private_server) -> None:
    _, series = private_pacs
    uid = series.series_uid
    params = {"label": "lesion", "roi": [100, 140, 100, 140, 4, 4], "slice": 4, "client_id": "reader-1"}
    r = private_server.post(f"/infer/medsam2_2d?image={uid}&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text[:500]
    # the series' info holds the PatientID: the next sample logs it; a client id that happens to be the
    # PatientID is logged as it came ("Active Learning Request: {...}") and must be found as a remembered value
    sample = private_server.post("/activelearning/random", json={"client_id": E2E_PID})
    assert sample.status_code == 200 and sample.json()["id"] == uid, sample.text
    assert sample.json().get("PatientID") == E2E_PID  # the answer to the client is not changed
    listing = private_server.get("/datastore/?output=all")
    assert listing.status_code == 200 and uid in listing.json()["objects"]

    served = requests.get(private_server.url + "/logs/", params={"lines": 5000, "text": "true"}, timeout=60)
    assert served.status_code == 200
    console = private_server.log.read_text()
    app_log = (APP_DIR / "logs" / "app.log").read_text(errors="replace")
    key = (APP_DIR / "model" / KEY_FILE).read_text().strip()
    expected = pseudonym(E2E_PID, bytes.fromhex(key))
    assert "Next sample: {" in console and f"'PatientID': '{expected}'" in console, console[-3000:]
    assert f"'client_id': '{expected}'" in console
    for what, text in (("server.log", console), ("logs/app.log", app_log), ("GET /logs/", served.text)):
        assert leaks(text) == [], what
    assert expected in served.text
    assert stat.S_IMODE((APP_DIR / "model" / KEY_FILE).stat().st_mode) == 0o600
