"""The simulated active-learning loop (bench/active_learning_loop.py), short: one seed, two cycles, tiny volumes.

Checks what the bench's numbers rest on: each strategy picks by its rule, the labelled set grows by K per cycle
with no study chosen twice, the annotator's corrections go through the engine's follow-up path and are counted,
the saved labels are the truth, the model is retrained every cycle and held-out Dice is measured each time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, image_size_overrides
from lib.engine.confidence import mask_ambiguity, mask_instability, propagation_uncertainty
from lib.engine.precision import compute_dtype_for
from lib.engine.volume_session import VolumeSession
from sam2_testing import object_present_bias

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import active_learning_loop as al  # noqa: E402

CPU = torch.device("cpu")
DTYPE = compute_dtype_for(CPU)
CONFIG = al.LoopConfig(
    pool=6,
    test=2,
    start=1,
    per_cycle=2,
    cycles=2,
    shape=(8, 32, 32),
    steps=2,
    epochs=1,
    start_steps=0,
    lr=1e-3,
    clip_length=3,
    annotator=al.AnnotatorSettings(max_corrections=2),
)


# --- the pieces, without a model ------------------------------------------------------------------------------------


def test_mask_ambiguity_is_the_unsure_share_of_the_outline():
    logits = torch.full((10, 10), -10.0)
    logits.view(-1)[:20] = 5.0  # sure inside
    logits.view(-1)[20:40] = 1.0  # unsure inside
    logits.view(-1)[40:50] = -1.0  # unsure outside
    assert mask_ambiguity([logits]) == pytest.approx(30 / 50)
    assert mask_ambiguity([logits, torch.full((10, 10), -10.0)]) == pytest.approx(30 / 50)  # empty slices skipped
    assert mask_ambiguity([torch.full((4, 4), -10.0)]) == 0.0
    assert mask_ambiguity([torch.full((4, 4), 8.0)]) == 0.0  # a sure mask of any size
    a = np.zeros((8, 8), bool)
    a[:4] = True
    assert mask_instability([a, a]) == 0.0 and mask_instability([a, ~a]) == 1.0


def test_the_annotator_fixes_the_slice_with_the_most_wrong_pixels_first():
    settings = al.AnnotatorSettings(threshold=0.8, min_error_px=4)
    truth = np.zeros((4, 20, 20), bool)
    truth[:, 5:15, 5:15] = True
    pred = truth.copy()
    assert al.worst_slice(pred, truth, settings) is None
    pred[1, 5:15, 5:9] = False  # 40 pixels missed
    pred[2] = False  # all 100 missed
    pred[3, 5:6, 5:8] = False  # 3 pixels: below min_error_px, and Dice 0.98
    assert al.worst_slice(pred, truth, settings) == 2
    assert al.worst_slice(pred, truth, settings, corrected=[2]) == 1  # then slices not corrected yet
    assert al.worst_slice(pred, truth, settings, corrected=[1, 2]) == 2
    # an empty answer gets a box around the object; a partial one a click deep in the larger error region
    assert al.correction_prompt(pred[2], truth[2], 2, settings)["box"] == [5.0, 5.0, 14.0, 14.0]
    fg = al.correction_prompt(pred[1], truth[1], 1, settings)["foreground"][0]
    assert truth[1][int(fg[1]), int(fg[0])] and not pred[1][int(fg[1]), int(fg[0])]
    over = truth[0].copy()
    over[2:18, 2:18] = True
    bg = al.correction_prompt(over, truth[0], 0, settings)["background"][0]
    assert over[int(bg[1]), int(bg[0])] and not truth[0][int(bg[1]), int(bg[0])]


def test_the_pool_has_the_documented_shares_and_the_curve_area_is_a_mean():
    cases = al.make_cases("case", 12, seed=5, shape=(12, 32, 32))
    assert [c.name for c in cases] == [f"case{i:03d}" for i in range(12)]
    kinds = [c.kind for c in cases]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "plain": 4,
        "faint": 2,
        "small": 2,
        "neighbour": 2,
        "drifting": 2,
    }
    assert all(c.study.label.any() and set(np.unique(c.study.label)) == {0, 1} for c in cases)
    assert [c.kind for c in al.make_cases("case", 12, seed=5, shape=(12, 32, 32))] == kinds  # deterministic
    assert al.area_under_curve([2, 4, 6], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert al.area_under_curve([2, 4, 6], [0.0, 1.0, 1.0]) == pytest.approx(0.75)


# --- the loop: one seed, two cycles, every strategy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    torch.manual_seed(0)
    base = object_present_bias(build_model(MEDSAM2_CONFIG, "cpu", image_size_overrides(128))).eval()
    features = al.FrozenEncoderFeatures(base)
    start = al.prepare_seed(3, base, CONFIG, tmp_path_factory.mktemp("al"), CPU, DTYPE, features)
    # the start model's own uncertainty scores, computed without the bench's shared encoder features
    scores = {
        c.name: propagation_uncertainty(
            VolumeSession(c.study.frames, start.model, CPU, DTYPE, al.SEGMENTER_FEATURE_DTYPE)
        )
        for c in start.pool
        if c.name not in start.start_ids
    }
    runs = {name: al.run_strategy(name, start, CONFIG, CPU, DTYPE, features) for name in al.STRATEGIES}
    return start, runs, scores


def picks_of(run: al.RunResult) -> list[str]:
    return [p.case for c in run.cycles for p in c.picks]


@pytest.mark.slow
def test_the_labelled_set_grows_by_k_per_cycle_without_repeats(loop):
    start, runs, _ = loop
    for name, run in runs.items():
        assert [c.labels for c in run.cycles] == [CONFIG.start + CONFIG.per_cycle * (n + 1) for n in range(2)], name
        picks = picks_of(run)
        assert len(picks) == len(set(picks)) == CONFIG.per_cycle * CONFIG.cycles, (name, picks)
        assert not set(picks) & set(start.start_ids), name
        assert set(run.datastore.final) == set(picks) | set(start.start_ids), name


@pytest.mark.slow
def test_corrections_are_counted_and_the_saved_labels_are_the_truth(loop):
    start, runs, _ = loop
    truth = {c.name: c.study.label for c in start.pool}
    annotations = [a for run in runs.values() for c in run.cycles for a in c.annotations]
    assert len(annotations) == len(runs) * CONFIG.per_cycle * CONFIG.cycles
    for a in annotations:
        assert isinstance(a.corrections, int) and 0 <= a.corrections <= CONFIG.annotator.max_corrections
        assert a.clicks + a.boxes == a.corrections == len(a.corrected_slices)
        # every correction went into the same session: the label's key slices are the box's plus the corrected ones
        box_slice = al.key_slice_prompts(truth[a.case])[0].slice_index
        assert a.key_slices == len({box_slice, *a.corrected_slices}), a
        assert 0.0 <= a.dice_first <= 1.0 and 0.0 <= a.dice_corrected <= 1.0
    # a random-weights model is far from the truth: the annotator had to correct
    assert sum(a.corrections for a in annotations) > 0
    for run in runs.values():
        for case_id, label in run.datastore.final.items():
            assert np.array_equal(label, truth[case_id]), case_id


@pytest.mark.slow
def test_held_out_dice_is_measured_every_cycle_and_the_model_is_retrained(loop):
    start, runs, _ = loop
    kinds = {c.kind for c in start.test}
    assert 0.0 <= start.start_scores["dice"] <= 1.0
    for name, run in runs.items():
        assert len(run.cycles) == CONFIG.cycles, name
        for c in run.cycles:
            assert 0.0 <= c.dice <= 1.0 and set(c.dice_by_kind) == kinds, (name, c)
            assert c.weights_changed and np.isfinite(c.train_loss), (name, c.cycle)
        assert al.trainable_fingerprint(run.model) != al.trainable_fingerprint(start.model), name
        assert al.encoder_fingerprint(run.model) == al.encoder_fingerprint(start.model), name  # frozen


@pytest.mark.slow
def test_first_picks_in_sorted_order(loop):
    start, runs, _ = loop
    unlabelled = sorted(c.name for c in start.pool if c.name not in start.start_ids)
    assert picks_of(runs["monai_first"]) == unlabelled[: CONFIG.per_cycle * CONFIG.cycles]


@pytest.mark.slow
def test_uncertainty_picks_the_highest_score(loop):
    start, runs, scores = loop
    run = runs["uncertainty"]
    labelled = set(start.start_ids)
    for c in run.cycles:
        for p in c.picks:
            unlabelled = {x.name for x in start.pool} - labelled
            assert set(p.scores) == unlabelled, (c.cycle, p)
            assert p.scores[p.case] == max(p.scores.values()), (c.cycle, p)
            labelled.add(p.case)
    # the first cycle's scores are the start model's, as propagation_uncertainty gives them on a fresh session
    first = run.cycles[0].picks[0]
    assert first.scores == pytest.approx(scores, abs=1e-4)
    assert first.case == max(scores, key=scores.get)
    second = run.cycles[0].picks[1]
    assert second.case == max((k for k in scores if k != first.case), key=scores.get)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random", "monai_random"])
def test_random_strategies_are_reproducible_under_a_seed(loop, name):
    start, runs, _ = loop
    replay = al.InMemoryDatastore(start.uris)
    for case_id in start.start_ids:
        replay.save_final(case_id, np.zeros(1))
    pick = al.make_strategy(name, None, start.seed, len(start.pool))
    again = []
    for _ in range(CONFIG.per_cycle * CONFIG.cycles):
        again.append(pick(replay).case)
        replay.save_final(again[-1], np.zeros(1))
    assert again == picks_of(runs[name])
    # another seed draws another order (checked on the whole pool, where a coincidence is unlikely)
    other, unseeded = al.InMemoryDatastore(start.uris), al.make_strategy(name, None, start.seed + 1, len(start.pool))
    order = []
    while other.get_unlabeled_images():
        order.append(unseeded(other).case)
        other.save_final(order[-1], np.zeros(1))
    reference, first = al.InMemoryDatastore(start.uris), al.make_strategy(name, None, start.seed, len(start.pool))
    seeded = []
    while reference.get_unlabeled_images():
        seeded.append(first(reference).case)
        reference.save_final(seeded[-1], np.zeros(1))
    assert sorted(order) == sorted(seeded) and order != seeded
