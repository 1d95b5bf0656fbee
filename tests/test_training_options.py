"""The one table of training options (``TrainSettings``' fields, lib/training/settings.py): an option added there
appears in ``/info``'s trainer config, in the request check and in the docs; MONAI Label's names for an option
are accepted, its other standard options refused with the reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from reference_docs import render_monailabel_names, render_tables

from lib.engine.checkpoints import resolve_checkpoint
from lib.engine.model_provider import ModelProvider
from lib.engine.preprocessing import parse_window
from lib.settings import SETTINGS, TRAIN_KEYS, training_settings
from lib.trainers.medsam2 import MedSAM2Trainer
from lib.training.options import MONAILABEL_UNMAPPED, check_train_body, client_config, parse_train_settings
from lib.training.settings import TrainSettings, option, train_options


@dataclasses.dataclass
class WithSmoothing(TrainSettings):
    """The table plus one option, declared as every option is."""

    label_smoothing: float = option(
        0.05, "share of each target moved towards 0.5", low=0.0, high=0.5, monailabel_names=("smoothing",)
    )


def trainer(defaults: TrainSettings, tmp_path: Path) -> MedSAM2Trainer:
    """The MONAI Label training task as the config builds it (no model is loaded to ask for its config)."""
    provider = ModelProvider(resolve_checkpoint("random"), torch.device("cpu"), None, tmp_path / "finetuned.pt")
    return MedSAM2Trainer(provider, parse_window("128,256"), tmp_path / "stats.json", defaults)


def test_an_option_added_to_the_table_is_in_info_the_request_check_and_the_docs(tmp_path: Path) -> None:
    table = train_options(WithSmoothing)
    assert [o.name for o in table] == [*TRAIN_KEYS, "label_smoothing"]
    task = trainer(WithSmoothing(), tmp_path)
    assert task.info()["config"]["label_smoothing"] == 0.05  # /info -> trainers.medsam2.config
    task.check_body({"label_smoothing": 0.1})
    task.check_body({"smoothing": "0.2"})  # MONAI Label's name for it
    assert parse_train_settings({"smoothing": 0.2}, WithSmoothing()).label_smoothing == 0.2
    for bad in (0.6, -0.1, "much", True):
        with pytest.raises(ValueError, match="train option label_smoothing must be a number from 0 to 0.5"):
            task.check_body({"label_smoothing": bad})
    docs = render_tables((*[s for s in SETTINGS if s.key not in TRAIN_KEYS], *training_settings(table)))
    assert "| `label_smoothing` | `0.05` | a number from 0 to 0.5 | share of each target moved towards 0.5 |" in docs
    assert "| `smoothing` | `label_smoothing` | share of each target moved towards 0.5 |" in (
        render_monailabel_names(table)
    )
    with pytest.raises(ValueError, match="label_smoothing must be a number from 0 to 0.5, got 0.9"):
        WithSmoothing(label_smoothing=0.9)


def test_a_field_without_its_table_entry_is_refused() -> None:
    @dataclasses.dataclass
    class Undeclared(TrainSettings):
        mystery: int = 3

    with pytest.raises(TypeError, match=r"Undeclared.mystery must be declared with option"):
        train_options(Undeclared)


def test_info_lists_the_options_as_monai_labels_clients_read_them(tmp_path: Path) -> None:
    config = trainer(TrainSettings(loss="dice_ce"), tmp_path).config()
    assert list(config) == [*TRAIN_KEYS, "multi_gpu", "gpus"]
    assert config["epochs"] == 10 and type(config["lr"]) is float and config["multi_gpu"] is False
    assert config["loss"] == ["dice_ce", "sam2"]  # a drop-down in Slicer, the default first
    assert config["train_parts"][0] == "no_image_encoder" and len(config["train_parts"]) == 4
    sent = {k: v[0] if isinstance(v, list) else v for k, v in config.items()}  # what Slicer's Train button sends
    check_train_body(sent, TrainSettings())
    assert parse_train_settings(sent, TrainSettings()) == TrainSettings(loss="dice_ce")


def test_monai_labels_names_are_accepted_where_they_mean_the_same() -> None:
    defaults = TrainSettings()
    body = {"max_epochs": 1, "train_batch_size": 2, "early_stop_patience": 0, "val_split": 0.3, "client_id": None}
    check_train_body(body, defaults)
    parsed = parse_train_settings(body, defaults)
    assert (parsed.epochs, parsed.clips_per_step, parsed.patience, parsed.val_fraction) == (1, 2, 0, 0.3)
    with pytest.raises(ValueError, match=r"epochs and max_epochs are the same option \(epochs\); send one"):
        check_train_body({"epochs": 2, "max_epochs": 1}, defaults)
    with pytest.raises(ValueError, match=r"train option max_epochs \(epochs here\) must be a whole number from 1"):
        check_train_body({"max_epochs": 0}, defaults)
    # MONAI Label's -1 (its default) turns early stopping off: 0 here; under this app's own name -1 is refused
    check_train_body({"early_stop_patience": -1}, defaults)
    assert parse_train_settings({"early_stop_patience": -1}, defaults).patience == 0
    with pytest.raises(ValueError, match=r"patience must be a whole number from 0"):
        check_train_body({"patience": -1}, defaults)


@pytest.mark.parametrize("name", sorted(MONAILABEL_UNMAPPED))
def test_monai_labels_other_standard_options_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ValueError, match=f"MONAI Label's train option {name} has no equivalent here: "):
        check_train_body({name: "x", "max_epochs": 1}, TrainSettings())


def test_client_config_and_the_table_agree_on_every_default() -> None:
    config = client_config(TrainSettings())
    for o in train_options():
        shown = config[o.name][0] if o.spec.choices else config[o.name]
        assert shown == o.default and type(shown) is o.kind, o.name
