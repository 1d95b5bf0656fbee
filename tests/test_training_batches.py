"""The batched training step: clips tracked together give each object what it gets alone, shorter clips are
padded without weight, the frozen encoder's outputs are reused exactly, the learning-rate schedule, early
stopping, the publish guard and the frozen reference set."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from test_training import learnable_volume

from lib.engine.checkpoints import build_model
from lib.training import clip_loss as clip_loss_module
from lib.training import loop
from lib.training.clip_loss import batch_clips, batch_loss
from lib.training.data import Study, sample_clip
from lib.training.encoder_features import EncoderFeatureCache, encode_slices
from lib.training.loop import FINAL_LR_FRACTION, clips_per_step_on, configure_trainable, scaled_lr, train, warmup_cosine
from lib.training.reference_set import freeze_reference, read_reference_names, split_studies
from lib.training.settings import TrainSettings
from sam2_testing import small_config_file

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    m = build_model(small_config_file(tmp_path_factory.mktemp("cfg"), 128), "cpu")
    configure_trainable(m, "no_image_encoder")
    return m.eval()  # eval: no dropout, so outputs compare exactly


def study(seed: int, name: str | None = None) -> Study:
    frames, label = learnable_volume(seed)
    return Study(name or f"s{seed}", frames, label, (2.0, 1.0, 1.0))


def fixed_clip(s: Study, start: int, length: int):
    rng = np.random.default_rng(0)
    clip = None
    while clip is None or clip.frames.shape[0] != length or clip.slices[0] != start:
        clip = sample_clip(s, length, 2, rng)
        if clip is not None and clip.slices[0] != start:  # rebuild it at the wanted start, forwards
            idx = np.arange(start, start + length)
            masks = np.stack([s.label[idx] == v for v in clip.values], axis=1)
            clip = type(clip)(s.frames[idx], masks, clip.values, s.name, idx)
    return clip


def tight_box_prompts(masks0, rng, image_size, kind):
    """The simulated annotator without jitter: the same prompt whatever else is in the batch."""
    b, h, w = masks0.shape
    coords = torch.zeros(b, 2, 2)
    for obj in range(b):
        ys, xs = np.nonzero(masks0[obj])
        coords[obj] = torch.tensor([[xs.min(), ys.min()], [xs.max(), ys.max()]], dtype=torch.float32)
    labels = torch.tensor([[2, 3]] * b, dtype=torch.int32)
    return {"point_coords": coords / torch.tensor([w, h]) * image_size, "point_labels": labels}, None


def test_batch_layout_pads_shorter_clips_with_their_last_slice_and_no_weight():
    a, b = study(0), study(1, "other")
    clip_a, clip_b = fixed_clip(a, 8, 4), fixed_clip(b, 8, 2)
    batch = batch_clips([clip_a, clip_b], 128)
    n_a, n_b = clip_a.masks.shape[1], clip_b.masks.shape[1]
    assert batch.slice_of.shape == batch.valid.shape == (4, n_a + n_b)
    assert batch.targets.shape == (4, n_a + n_b, 128, 128)
    assert len(batch.keys) == len(batch.frames) == 6 and batch.keys[0] == ("s0", 8)
    assert batch.valid[:, :n_a].all() and batch.valid[:2, n_a:].all() and not batch.valid[2:, n_a:].any()
    assert (batch.slice_of[2:, n_a:] == batch.slice_of[1, n_a:]).all()  # the last slice repeated


def test_objects_tracked_together_get_what_they_get_alone(model, monkeypatch):
    monkeypatch.setattr(clip_loss_module, "simulate_prompts", tight_box_prompts)
    settings = TrainSettings(p_box=1.0, feature_cache_mb=0)
    a, b = study(0), study(1, "other")
    clip_a = fixed_clip(a, 8, 4)

    def loss(clips) -> float:
        with torch.no_grad():
            return float(batch_loss(model, clips, settings, np.random.default_rng(0), CPU, nullcontext()))

    alone = loss([clip_a])
    assert loss([clip_a, clip_a]) == pytest.approx(alone, rel=1e-4)
    # the same objects cut short after 2 slices: padded steps carry no weight, the first two match exactly
    truncated = type(clip_a)(clip_a.frames[:2], clip_a.masks[:2], clip_a.values, clip_a.study, clip_a.slices[:2])
    assert loss([clip_a, truncated]) == pytest.approx(alone, rel=1e-4)
    assert loss([clip_a, fixed_clip(b, 8, 4)]) != pytest.approx(alone, rel=1e-4)  # other objects do count


def test_cached_encoder_outputs_are_the_encoders_and_are_reused(model):
    s = study(2)
    keys, frames = [("s2", k) for k in range(4)], [s.frames[k] for k in range(4)]
    cache = EncoderFeatureCache(1 << 30)
    with torch.no_grad():
        expected = model.forward_image(torch.cat([_model_input(f, model) for f in frames]))
        first = encode_slices(model, keys, frames, CPU, nullcontext(), cache)
        again = encode_slices(model, keys[1:3], frames[1:3], CPU, nullcontext(), cache)
    for got, want in zip(first["backbone_fpn"], expected["backbone_fpn"], strict=False):
        torch.testing.assert_close(got, want)
    for got, want in zip(again["backbone_fpn"], expected["backbone_fpn"], strict=False):
        torch.testing.assert_close(got, want[1:3])
    assert (cache.misses, cache.hits) == (4, 2)


def test_feature_cache_keeps_within_its_bytes_and_is_skipped_while_the_encoder_trains(model):
    s = study(3)
    with torch.no_grad():
        per_slice = model.image_encoder(_model_input(s.frames[0], model))["backbone_fpn"]
    one = sum(t.numel() * t.element_size() for t in per_slice)
    cache = EncoderFeatureCache(2 * one + 1)
    frames = [s.frames[k] for k in range(3)]
    with torch.no_grad():
        encode_slices(model, [("s3", k) for k in range(3)], frames, CPU, nullcontext(), cache)
    assert cache.bytes <= 2 * one + 1 and cache.get(("s3", 0)) is None and cache.get(("s3", 2)) is not None
    configure_trainable(model, "all")
    try:
        fresh = EncoderFeatureCache(1 << 30)
        encode_slices(model, [("s3", 0)], frames[:1], CPU, nullcontext(), fresh)
        assert fresh.misses == fresh.hits == fresh.bytes == 0
    finally:
        configure_trainable(model, "no_image_encoder")


def _model_input(frame, model):
    from lib.engine.preprocessing import frames_to_model_input

    return frames_to_model_input(frame[None], model.image_size, CPU)


def test_warmup_then_cosine_decay_to_the_floor():
    factors = [warmup_cosine(s, 100, 10) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))  # never rises after the warm-up
    assert factors[100] == pytest.approx(FINAL_LR_FRACTION)
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)
    assert scaled_lr(1e-4, 4, 1) == pytest.approx(2e-4) and scaled_lr(1e-4, 4, 4) == pytest.approx(4e-4)
    assert clips_per_step_on(CPU, 0) == 1 and clips_per_step_on(torch.device("cuda"), 0) == 4
    assert clips_per_step_on(CPU, 3) == 3


def _scripted_evaluate(monkeypatch, held_out: list[float], reference: list[float]):
    """Validation scores in the order the loop asks for them (the training itself runs for real)."""
    calls = {"held_out": iter(held_out), "reference": iter(reference)}

    def evaluate(model, studies, device, dtype, tolerance):
        kind = "reference" if studies and studies[0].name.startswith("ref") else "held_out"
        return {"dice": next(calls[kind]), "nsd": 0.0, "per_label": {}}

    monkeypatch.setattr(loop, "evaluate", evaluate)


def test_publish_guard_refuses_a_better_held_out_epoch_that_harms_the_reference(model, monkeypatch):
    # held-out Dice: before, then epochs 1..4; reference Dice: before, then for each epoch better on the
    # held-out set than the last published one (a refused epoch does not raise that bar: epoch 3 is checked)
    _scripted_evaluate(monkeypatch, [0.1, 0.5, 0.7, 0.6, 0.8], [0.6, 0.59, 0.4, 0.5, 0.61])
    published = []
    settings = TrainSettings(epochs=4, steps_per_epoch=1, clips_per_step=1, clip_length=2, patience=0)
    result = train(
        model, [study(0)], [study(1)], settings, CPU, None, lambda m, r: published.append(r.epoch),
        reference_studies=[study(5, "ref5")],
    )  # fmt: skip
    assert published == [1, 4]  # epochs 2 and 3 beat epoch 1 on the held-out set but lost on the reference
    assert [e.published for e in result.epochs] == [True, False, False, True]
    assert [e.best for e in result.epochs] == [True, True, True, True]
    refused = result.epochs[1]
    assert refused.best and refused.reference_dice == 0.4 and "fell from 0.6000 to 0.4000" in refused.not_published
    assert result.reference_before == 0.6 and result.reference_dice == 0.61 and result.not_published == ""
    assert result.best_epoch == 4 and result.best_dice == 0.8


def test_training_stops_early_after_patience_epochs_without_a_better_validation(model, monkeypatch):
    _scripted_evaluate(monkeypatch, [0.1, 0.5, 0.4, 0.45, 0.9, 0.9], [])
    settings = TrainSettings(epochs=5, steps_per_epoch=1, clips_per_step=1, clip_length=2, patience=2)
    result = train(model, [study(0)], [study(1)], settings, CPU, None, lambda m, r: None)
    assert len(result.epochs) == 3 and "2 epochs" in result.stopped_early and result.best_epoch == 1


def test_reference_set_is_frozen_by_the_first_run_and_never_trained_on(tmp_path):
    items = [(f"case{i}.nii.gz", "img", "lab") for i in range(10)]
    first = split_studies(items, 0.2, [])
    assert (
        first.newly_frozen
        and first.reference == []
        and [i[0] for i in first.held_out]
        == [
            "case8.nii.gz",
            "case9.nii.gz",
        ]
    )
    path = tmp_path / "reference_studies.json"
    freeze_reference(path, [i[0] for i in first.held_out])
    frozen = read_reference_names(path)
    more = items + [(f"case{i}.nii.gz", "img", "lab") for i in range(10, 15)]
    second = split_studies(sorted(more), 0.2, frozen)
    names = {i[0] for i in second.train}
    assert not second.newly_frozen and {i[0] for i in second.reference} == set(frozen)
    assert not names & set(frozen) and not names & {i[0] for i in second.held_out}
    with pytest.raises(ValueError, match="all 2 labelled studies are in the frozen reference set"):
        split_studies(first.held_out, 0.2, frozen)
    path.write_text("{not json")
    assert read_reference_names(path) == []
