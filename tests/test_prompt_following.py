"""Prompt sensitivity in validation and in the publish guard: the overlap of an answer with the objects that were
not prompted, the guard's bounds (publish_max_drop, publish_max_overlap_rise), and, with the reference model, that a
model which follows prompts passes while one that does not (its prompt encoder zeroed, or random weights) is refused
with a reason that says so."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lib.engine.checkpoints import build_model
from lib.training import loop
from lib.training.loop import PublishGuard, train
from lib.training.prompt_following import click_prompts, score_prompt_following, wrong_box_prompts
from lib.training.settings import TrainSettings
from lib.training.synthetic import VolumeRecipe, generate_studies, held_out_studies
from lib.training.validation import evaluate, other_object_overlap
from sam2_testing import REFERENCE_CONFIG

CPU = torch.device("cpu")


def test_other_object_overlap_is_the_largest_share_of_another_object_covered():
    label = np.zeros((1, 4, 10), dtype=np.uint8)
    label[0, :, 0:2], label[0, :, 3:7], label[0, :, 8:10] = 1, 2, 3  # 8, 16 and 8 voxels
    pred = label == 1
    assert other_object_overlap(pred, label, 1) == 0.0
    pred[0, :2, 8:10] = True  # half of object 3
    pred[0, 0, 3:7] = True  # a quarter of object 2
    assert other_object_overlap(pred, label, 1) == pytest.approx(0.5)
    assert other_object_overlap(label > 0, label, 2) == 1.0  # an answer that takes every object
    assert other_object_overlap(pred, (label == 1).astype(np.uint8), 1) is None  # no other object to measure


def test_publish_guard_bounds():
    guard = PublishGuard(["ref"], max_drop=0.02, max_overlap_rise=0.05)
    guard.before = {"dice": 0.80, "other_overlap": 0.04}
    guard.held_out_before = {"dice": 0.70, "other_overlap": 0.05}
    assert guard.refusal({"dice": 0.79, "other_overlap": 0.08}, {"dice": 0.75, "other_overlap": 0.09}) == ""
    reason = guard.refusal({"dice": 0.70, "other_overlap": 0.04}, {"dice": 0.75, "other_overlap": 0.05})
    assert "fell from 0.8000 to 0.7000" in reason and "publish_max_drop" in reason
    reason = guard.refusal({"dice": 0.80, "other_overlap": 0.30}, {"dice": 0.75, "other_overlap": 0.40})
    assert reason.count("publish_max_overlap_rise") == 2 and "follows the prompts less" in reason
    assert "rose from 0.0500 to 0.4000 on the held-out studies" in reason
    # studies of one object each have no overlap to measure: only Dice is checked
    assert guard.refusal({"dice": 0.80, "other_overlap": None}, {"dice": 0.75, "other_overlap": None}) == ""


def test_click_and_wrong_box_prompts_name_the_objects_they_are_on():
    study = held_out_studies(1)[0]
    clicks = click_prompts(study.label)
    assert all(study.label[p.slice_index, int(p.points[0][1]), int(p.points[0][0])] == p.label_value for p in clicks)
    for first, prompt in wrong_box_prompts(study.label):
        x0, y0, x1, y1 = (int(v) for v in prompt.box)
        inside = study.label[prompt.slice_index, y0 : y1 + 1, x0 : x1 + 1]
        assert prompt.label_value != first and (inside == prompt.label_value).any()


@pytest.fixture(scope="module")
def tiny_studies():
    recipe = VolumeRecipe(slices=12, size=48, extent=(5, 8), radius=(5.0, 8.0))
    return generate_studies(range(3), recipe)


def test_loop_refuses_a_better_epoch_whose_answers_take_other_objects(tiny_studies, monkeypatch, reference_model):
    """Held-out Dice rises every epoch, but epoch 2's answers cover the objects that were not prompted: it is not
    published (the real loop trains for real; the validation scores are scripted)."""
    held_out = iter([(0.1, 0.05), (0.5, 0.06), (0.7, 0.50), (0.8, 0.07)])

    def scripted(model, studies, device, dtype, tolerance):
        dice, overlap = next(held_out)
        return {"dice": dice, "nsd": 0.0, "other_overlap": overlap, "per_label": {}}

    monkeypatch.setattr(loop, "evaluate", scripted)
    published = []
    settings = TrainSettings(epochs=3, steps_per_epoch=1, clips_per_step=1, clip_length=2, train_parts="all")
    model = copy.deepcopy(reference_model)
    result = train(
        model, tiny_studies[:2], tiny_studies[2:], settings, CPU, None, lambda m, r: published.append(r.epoch)
    )
    assert published == [1, 3] and [e.val_other_overlap for e in result.epochs] == [0.06, 0.50, 0.07]
    refused = result.epochs[1]
    assert refused.best and not refused.published and "rose from 0.0500 to 0.5000" in refused.not_published


def zeroed_prompt_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every prompt embedding zeroed: boxes and clicks no longer reach the mask decoder."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.sam_prompt_encoder.parameters():
            p.zero_()
    return broken


@pytest.fixture(scope="module")
def scored_studies():
    return held_out_studies(2, start=50)


def test_the_reference_model_passes_the_guard_and_a_prompt_blind_one_is_refused(reference_model, scored_studies):
    before = evaluate(reference_model, scored_studies, CPU, None, 2.0)
    assert before["dice"] > 0.8 and before["other_overlap"] < 0.1
    guard = PublishGuard(scored_studies, max_drop=0.02, max_overlap_rise=0.05, before=before, held_out_before=before)
    assert guard.refusal(before, before) == ""
    # without its prompt embeddings the model still sees where a box is (the positional encoding is a buffer), but
    # its answers lose most of the object: refused for the Dice it lost on the reference studies
    blind = evaluate(zeroed_prompt_encoder(reference_model), scored_studies, CPU, None, 2.0)
    assert "Dice on the 2 reference studies fell from" in guard.refusal(blind, blind)
    # random weights answer with pieces of every object: refused for that too, on both sets of studies
    torch.manual_seed(0)
    random = evaluate(build_model(REFERENCE_CONFIG).eval(), scored_studies, CPU, None, 2.0)
    reason = guard.refusal(random, random)
    assert "Dice on the 2 reference studies fell" in reason and reason.count("follows the prompts less") == 2, reason


def test_wrong_box_control_returns_the_other_object(reference_model, scored_studies):
    scores = score_prompt_following(reference_model, scored_studies, CPU).summary()
    assert scores["wrong_box"]["dice_mean"] > 0.8 and scores["wrong_box"]["overlap_mean"] < 0.1, scores
    assert scores["click"]["dice_mean"] > 0.75 and scores["past_end"]["share"] < 0.2, scores
