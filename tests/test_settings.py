"""The one settings table (lib/settings.py): every key refuses a bad value with one line naming it, good values
parse to their types, defaults are the table's, unknown keys are refused, and docs/configuration.md shows it."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import pytest
from reference_docs import DOC, with_tables

from conftest import REPO
from lib.engine.checkpoints import MEDSAM2_CONFIG
from lib.engine.preprocessing import IntensityWindow
from lib.engine.propagation import StopRule
from lib.settings import (
    SETTINGS,
    SETTINGS_BY_KEY,
    TRAIN_KEYS,
    AppSettings,
    ByDevice,
    Choice,
    Number,
    Setting,
    SettingError,
    TrainOptionText,
    parse_settings,
)
from lib.training.settings import TrainSettings, train_options

# bad values of the keys whose parser is neither a Number nor a Choice (a new such key needs an entry here)
CUSTOM_BAD: dict[str, list[str]] = {
    "checkpoint": ["/nonexistent/medsam2.pt", "MedSAM2_lastest"],
    "model_config": ["/nonexistent/config.yaml", str(REPO)],
    "finetuned_checkpoint": [str(REPO)],
    "models": ["medsam3", "all,medsam3", ",", ""],
    "window": ["sunset", "40", "40,0", "40,-400", "nan,400"],
    "labels": ['{"lesion":0}', "{}", "[1,2]", '{"a":1,"b":1}', '{"a":1.5}', '{"a":true}', '{"a":256}', "lesion=1"],
    "device": ["gpu", "cuda:x", "cdua"],
    "stop_rule": ["sometimes", "0,0", "0,3,1", "x,3"],
    "local_corrections": ["sometimes", "0,0.9", "3,1.5", "3,0.9,1", "x,0.9"],
    "replica_name": ["replica one", "a/b", "x" * 65, "node;rm"],
    "adapter": ["../site", "a b", "x" * 65, "site.pt"],
    "adapter_name": ["", "../site", "a/b", "x" * 65],
    "allow_untested_monailabel": ["yes", "1", "", "True!"],
    "checkpoint_sha256": ["abc", "g" * 64, "0" * 65],
    "auth_audience": ["a b", "a\tb"],
    "ohif_client_id": ["ohif viewer", "a\tb"],
    "auth_issuer": ["ftp://idp", "idp.example", "https://"],
    "api_keys_file": ["/", "/tmp"],
    "pacs_token_file": ["/", "/tmp"],
}


def bad_values(setting: Setting) -> list[str]:
    """Values the key must refuse, from its parser's bounds or choices, else from CUSTOM_BAD."""
    parser = setting.parser
    if isinstance(parser, TrainOptionText):  # a training option: its type and bounds or choices from its table entry
        o = parser.option
        parser = Number(o.kind, o.spec.low, o.spec.high) if o.kind in (int, float) else parser
        parser = Choice(o.spec.choices) if o.spec.choices else parser
    if isinstance(parser, Number):
        values = ["", "x", "6GB", "nan", "inf", "-inf"]
        if math.isfinite(parser.low):
            values.append(str(parser.low) if parser.low_excluded else str(parser.low - 1))
        if math.isfinite(parser.high):
            values.append(str(parser.high * 2 + 1))
        if parser.kind is int:
            values.append(f"{max(parser.low, 0) + 1.5}")
        return values
    if isinstance(parser, Choice):
        return ["nonsense", "", "AUTO-"]
    assert setting.key in CUSTOM_BAD, f"add bad values of --conf {setting.key} to CUSTOM_BAD"
    return CUSTOM_BAD[setting.key]


BAD_CASES = [(s.key, value) for s in SETTINGS for value in bad_values(s)]


@pytest.mark.parametrize(("key", "value"), BAD_CASES)
def test_every_key_refuses_a_bad_value_in_one_line_naming_the_key_and_the_value(key: str, value: str) -> None:
    with pytest.raises(SettingError) as refused:
        parse_settings({key: value}, cuda_available=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--conf {key}"), message
    assert repr(value)[1:-1] in message or value in message, message


def test_every_key_has_bad_values() -> None:
    assert {key for key, _ in BAD_CASES} == set(SETTINGS_BY_KEY)


def test_messages_tests_and_administrators_rely_on() -> None:
    def message(conf: dict[str, str]) -> str:
        with pytest.raises(SettingError) as refused:
            parse_settings(conf, cuda_available=False)
        return str(refused.value)

    assert message({"dicomweb_timeout_s": "-1"}).startswith("--conf dicomweb_timeout_s must be seconds")
    assert message({"max_session_gb": "6GB"}) == "--conf max_session_gb must be a number of GiB, more than 0, got '6GB'"
    assert "Unknown intensity window 'sunset'" in message({"window": "sunset"})
    assert "/nonexistent/medsam2.pt" in message({"checkpoint": "/nonexistent/medsam2.pt"})
    assert message({"auto_train_after": "-1"}).startswith("--conf auto_train_after must be a whole number")
    assert "max_concurrent_infers" in message({"max_concurrent_infers": "0"})


def test_an_unknown_key_is_refused_with_a_suggestion_and_monai_labels_own_key_passes() -> None:
    with pytest.raises(SettingError, match=r"Unknown --conf key 'max_sesions' \(did you mean max_sessions\?\)"):
        parse_settings({"max_sesions": "8"}, cuda_available=False)
    assert parse_settings({"server_mode": "true"}, cuda_available=False).max_sessions == 4


def _is_instance(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if origin is not None:
        return isinstance(value, origin)
    return value is None if hint is type(None) else isinstance(value, hint)  # type: ignore[arg-type]


def test_defaults_are_the_tables_and_have_the_declared_types() -> None:
    hints = typing.get_type_hints(AppSettings) | typing.get_type_hints(TrainSettings)
    for cuda in (False, True):
        parsed = parse_settings({}, cuda_available=cuda)
        for s in SETTINGS:
            value = getattr(parsed.train if s.key in TRAIN_KEYS else parsed, s.key)
            assert _is_instance(value, hints[s.key]), (s.key, value)
            if s.key != "device":
                assert value == s.read(s.default_text("cuda" if cuda else "cpu")), s.key
        assert parsed.device == ("cuda" if cuda else "cpu")


def test_the_documented_defaults() -> None:
    cpu, gpu = parse_settings({}, cuda_available=False), parse_settings({}, cuda_available=True)
    assert (cpu.encode_batch, gpu.encode_batch) == (4, 16)
    assert (cpu.max_concurrent_infers, gpu.max_concurrent_infers) == (4, 1)
    assert parse_settings({"device": "cuda"}, cuda_available=False).encode_batch == 16  # the device named
    assert (cpu.max_sessions, cpu.max_session_gb, cpu.max_voxels) == (4, 6.0, 512 * 512 * 1200)
    assert (cpu.max_queued_infers, cpu.queue_timeout_s, cpu.slices_to_check) == (32, 120.0, 5)
    assert (cpu.dicomweb_timeout_s, cpu.pacs_resend_every_s, cpu.auto_train_after) == (30.0, 30.0, 0)
    assert (cpu.checkpoint, cpu.model_config, cpu.finetuned_checkpoint) == ("MedSAM2_latest", None, None)
    assert cpu.labels == {"lesion": 1, "organ": 2, "vessel": 3, "other": 4}
    assert (cpu.window.mode, cpu.precision, cpu.stop_rule, cpu.models) == ("auto", "auto", None, ("medsam2",))
    assert cpu.train == TrainSettings()


def test_good_values_parse_to_their_types(tmp_path: Path) -> None:
    conf = {
        "checkpoint": "random",
        "model_config": str(MEDSAM2_CONFIG),
        "finetuned_checkpoint": str(tmp_path / "sub" / ".." / "tuned.pt"),
        "models": "medsam2",
        "window": "40,400",
        "labels": '{"liver":1,"tumour":2}',
        "device": "cpu",
        "precision": "fp32",
        "stop_rule": "0.5,4",
        "slices_to_check": "0",
        "max_sessions": "8",
        "max_session_gb": "0.5",
        "max_voxels": "1e6",
        "encode_batch": "2.0",
        "max_concurrent_infers": "2",
        "max_queued_infers": "0",
        "queue_timeout_s": "2.5",
        "dicomweb_timeout_s": "3600",
        "pacs_resend_every_s": "1",
        "replica_name": "gpu-node-2:8001",
        "auto_train_after": "3",
        "epochs": "5",
        "steps_per_epoch": "40",
        "lr": "1e-4",
        "train_parts": "all",
        "loss": "dice_ce",
        "seed": str(2**32 - 1),
    }
    s = parse_settings(conf, cuda_available=True)
    assert (s.checkpoint, s.model_config, s.finetuned_checkpoint) == ("random", MEDSAM2_CONFIG, tmp_path / "tuned.pt")
    assert s.models == ("medsam2",) and s.labels == {"liver": 1, "tumour": 2}
    assert s.window == IntensityWindow("ct", 40.0, 400.0, name="L40/W400")
    assert (s.device, s.device_type, s.precision, s.stop_rule) == ("cpu", "cpu", "fp32", StopRule(0.5, 4))
    assert (s.slices_to_check, s.max_sessions, s.max_session_gb, s.max_voxels, s.encode_batch) == (0, 8, 0.5, 10**6, 2)
    assert (s.max_concurrent_infers, s.max_queued_infers, s.queue_timeout_s) == (2, 0, 2.5)
    assert (s.dicomweb_timeout_s, s.pacs_resend_every_s, s.auto_train_after) == (3600.0, 1.0, 3)
    train = TrainSettings(epochs=5, steps_per_epoch=40, lr=1e-4, train_parts="all", loss="dice_ce", seed=2**32 - 1)
    assert s.train == train
    assert all(type(getattr(s, k)) is int for k in ("max_voxels", "encode_batch", "max_sessions"))
    assert parse_settings({"device": "cuda:1"}, cuda_available=False).device_type == "cuda"
    assert parse_settings({"stop_rule": "on"}, cuda_available=False).stop_rule == StopRule()


def test_the_table_covers_every_training_option_and_every_app_setting() -> None:
    fields = [f.name for f in dataclasses.fields(TrainSettings)]
    assert list(TRAIN_KEYS) == fields and set(fields) <= set(SETTINGS_BY_KEY)
    assert all(o.meaning and o.allowed for o in train_options()), "every training option needs a meaning"
    app_fields = {f.name for f in dataclasses.fields(AppSettings)} - {"train"}
    assert app_fields == set(SETTINGS_BY_KEY) - set(fields)
    assert len(SETTINGS) == len(SETTINGS_BY_KEY)  # no key twice
    assert all(s.meaning and s.parser.allowed for s in SETTINGS)
    for s in SETTINGS:  # every default, on either device, is an allowed value
        for device in ("cuda", "cpu"):
            s.read(s.default_text(device))
    assert any(isinstance(s.default, ByDevice) for s in SETTINGS)


def test_text_choices_of_training_options_are_what_train_settings_accepts() -> None:
    for o in (o for o in train_options() if o.spec.choices):
        for choice in o.spec.choices:
            TrainSettings(**{o.name: choice})
        with pytest.raises(ValueError, match=o.name):
            TrainSettings(**{o.name: "nonsense"})


def test_the_reference_docs_is_generated_from_the_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert with_tables(text) == text, "run: .venv/bin/python scripts/reference_docs.py"
    for s in SETTINGS:
        assert f"| `{s.key}` |" in text


def test_the_repository_names_only_known_settings() -> None:
    """Typo protection for what the tests, scripts, benchmarks and docs pass as ``--conf`` keys."""
    known = set(SETTINGS_BY_KEY) | {"key", "key1", "key2", "option"}  # placeholders in prose
    pattern = re.compile(r"--conf(?: +|\", \")([a-z_0-9]+)")
    files = [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("bench/*"), *REPO.glob("scripts/*")]
    files += [*REPO.glob("tests/*.py")]
    named = {
        (p.name, key)
        for p in files
        if p.is_file() and p.suffix in (".md", ".py", ".sh")
        for key in pattern.findall(p.read_text(encoding="utf-8", errors="replace"))
    }
    assert {(name, key) for name, key in named if key not in known} == set()
