"""Multi-GPU fine-tuning (DDP), run as 2 CPU processes over gloo: gradients are averaged across ranks, both
ranks' clips count, only rank 0 validates and publishes, a stop or a failure on one rank ends both, and the
MONAI Label trainer takes MONAI Label's ``multi_gpu``/``gpus`` request options."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monailabel.interfaces.exception import MONAILabelException
from test_training import learnable_volume
from torch.multiprocessing import ProcessRaisedException

import lib.training.loop as training_loop
from conftest import write_image
from lib.engine.checkpoints import (
    MEDSAM2_CONFIG,
    build_model,
    image_size_overrides,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from lib.engine.model_provider import ModelProvider
from lib.engine.preprocessing import parse_window
from lib.trainers.medsam2 import MedSAM2Trainer
from lib.training.data import Study
from lib.training.distributed import CPU_RANKS_ENV, DistributedContext, DistributedPlan, launch, plan_distributed
from lib.training.loop import configure_trainable, train
from lib.training.settings import TrainSettings
from sam2_testing import small_config_file

TWO_CPU_RANKS = DistributedPlan("gloo", ("cpu", "cpu"))
SIZE = 128  # model input: the MedSAM2 architecture (same parameters) at 1/16 of the pixels, for 2 CPU cores
# 4 clips per epoch: 2 steps on each of the 2 ranks
SETTINGS = TrainSettings(  # one clip per step: each rank's steps are counted below
    epochs=1,
    steps_per_epoch=4,
    clips_per_step=1,
    clip_length=3,
    max_objects=2,
    lr=3e-3,
    grad_clip=1.0,
    p_box=1.0,
    seed=7,
)


def test_plan_follows_monai_label_multi_gpu_options():
    assert plan_distributed(False, "all", 4) is None
    assert plan_distributed(None, None, 4) is None
    assert plan_distributed(True, "all", 1) is None  # fewer than 2 GPUs: one process, as MONAI Label does
    assert plan_distributed(True, "all", 0) is None
    assert plan_distributed(True, "0", 2) is None
    plan = plan_distributed(True, "all", 3)
    assert plan == DistributedPlan("nccl", ("cuda:0", "cuda:1", "cuda:2")) and plan.world_size == 3
    assert plan_distributed("true", "", 2) == DistributedPlan("nccl", ("cuda:0", "cuda:1"))
    assert plan_distributed(True, "2, 0", 4) == DistributedPlan("nccl", ("cuda:2", "cuda:0"))
    assert plan_distributed(True, [1, 3], 4) == DistributedPlan("nccl", ("cuda:1", "cuda:3"))
    assert plan_distributed(True, "all", 2, nccl_available=False).backend == "gloo"
    assert plan_distributed("false", "all", 4) is None
    # the test/development switch: CPU processes over gloo, GPUs or not
    assert plan_distributed(True, "all", 0, cpu_ranks=2) == TWO_CPU_RANKS
    assert plan_distributed(True, "0,1", 8, cpu_ranks=3) == DistributedPlan("gloo", ("cpu",) * 3)
    assert plan_distributed(False, "all", 0, cpu_ranks=2) is None
    assert plan_distributed(True, "all", 2, cpu_ranks=1) == DistributedPlan("nccl", ("cuda:0", "cuda:1"))
    for gpus, count in (("0,2", 2), ("0,0", 2), ("a,b", 2), ("-1,0", 2)):
        with pytest.raises(ValueError, match="gpus"):
            plan_distributed(True, gpus, count)


def _study(seed: int) -> Study:
    frames, label = learnable_volume(seed)
    return Study(f"s{seed}", frames, label, (2.0, 1.0, 1.0))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MEDSAM2_CONFIG, "cpu", image_size_overrides(SIZE))


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that ``SETTINGS`` trains (all but the image encoder's)."""
    configure_trainable(model, SETTINGS.train_parts)
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _log(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def _train_worker(context: DistributedContext, device: torch.device, out: Path, stop_at: int, fail_at: int) -> None:
    """One rank: fine-tune the small model; record what each rank did under ``out``.

    Validation is replaced by a counter whose Dice rises every call, so every epoch "improves" and publishes.
    Rank 1 asks to stop (``stop_at``) or raises (``fail_at``) at the start of that step (1-based; 0: never).
    """
    rank = context.rank
    calls = {"evaluate": 0, "steps": 0}

    def counting_evaluate(model, studies, device, compute_dtype, tolerance_mm) -> dict:
        _log(out / "evaluate.log", str(rank))
        calls["evaluate"] += 1
        return {"dice": float(calls["evaluate"]), "nsd": 0.0, "per_label": {}}

    def publish(m: torch.nn.Module, report) -> None:
        _log(out / "publish.log", str(rank))
        save_checkpoint(m, out / "published.pt")

    def should_stop() -> bool:
        calls["steps"] += 1
        if rank == 1 and calls["steps"] == fail_at:
            _log(out / "failed.log", str(rank))
            raise RuntimeError("rank 1 failed on purpose")
        return rank == 1 and calls["steps"] == stop_at

    training_loop.evaluate = counting_evaluate  # this process only
    model = _model()
    studies = [_study(s) for s in range(4)]
    result = train(
        model, studies, [_study(100)], SETTINGS, device, None, publish, should_stop=should_stop, distributed=context
    )
    torch.save(_trainable(model), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"steps": calls["steps"], "epochs": len(result.epochs)}))


def _single_process_run(seed: int, steps: int) -> dict[str, torch.Tensor]:
    """What one process alone does with the clips of the rank whose seed is ``seed`` (one thread, as each rank)."""
    settings = TrainSettings(**{**SETTINGS.__dict__, "seed": seed, "steps_per_epoch": steps})
    model = _model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, [_study(s) for s in range(4)], [], settings, torch.device("cpu"), None, lambda m, r: None)
    finally:
        torch.set_num_threads(threads)
    return _trainable(model)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_average_gradients_and_only_rank0_validates_and_publishes(tmp_path):
    launch(TWO_CPU_RANKS, _train_worker, (tmp_path, 0, 0))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    start = _trainable(_model())
    assert ranks[0].keys() == start.keys() and not any(k.startswith("image_encoder.") for k in start)
    # (a) the ranks took identical steps: their gradients were averaged
    for name in start:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert any(not torch.equal(ranks[0][k], start[k]) for k in start)  # and they did train
    # 4 clips per epoch over 2 ranks: 2 steps each
    assert [r["steps"] for r in reports] == [2, 2] and [r["epochs"] for r in reports] == [1, 0]
    # (b) both ranks' clips mattered: one process alone with rank 0's clips (seed 7, 2 steps), or with rank 1's
    # (seed 8), ends elsewhere. Measured here: 14% of the training update apart (0 when both ranks are given the
    # same clips: the single run then matches the ranks exactly), while the two single runs are 26% apart.
    update = sum(float((ranks[0][k] - start[k]).abs().sum()) for k in start)
    for seed in (SETTINGS.seed, SETTINGS.seed + 1):
        alone = _single_process_run(seed, steps=2)
        apart = sum(float((alone[k] - ranks[0][k]).abs().sum()) for k in start) / update
        assert apart > 0.05, (seed, apart)
    # (c) only rank 0 validated (before training and after the epoch) and published, once
    assert (tmp_path / "evaluate.log").read_text().split() == ["0", "0"]
    assert (tmp_path / "publish.log").read_text().split() == ["0"]
    published = load_model(resolve_checkpoint(str(tmp_path / "published.pt"), config=small_config_file(tmp_path, SIZE)))
    state = dict(published.named_parameters())
    assert all(torch.equal(state[k].detach(), ranks[0][k]) for k in start)  # the trained weights, loaded strictly


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stop_or_a_failure_on_one_rank_ends_both_without_publishing(tmp_path):
    stopped, failed = tmp_path / "stopped", tmp_path / "failed"
    stopped.mkdir()
    failed.mkdir()
    launch(TWO_CPU_RANKS, _train_worker, (stopped, 2, 0))
    # rank 1 asked at its second step; rank 0 stopped at the same step, not after its own 2 steps + validation
    assert [json.loads((stopped / f"rank{r}.json").read_text()) for r in range(2)] == [{"steps": 2, "epochs": 0}] * 2
    assert (stopped / "evaluate.log").read_text().split() == ["0"]  # the validation before training only
    assert not (stopped / "publish.log").exists() and not (stopped / "published.pt").exists()

    t0 = time.perf_counter()
    with pytest.raises(ProcessRaisedException):  # rank 1's error, or rank 0's lost connection to it
        launch(TWO_CPU_RANKS, _train_worker, (failed, 0, 2))
    assert time.perf_counter() - t0 < 120  # rank 0, waiting in a collective, was ended, not left hanging
    assert (failed / "failed.log").read_text().split() == ["1"]
    assert not (failed / "rank0.json").exists() and not (failed / "publish.log").exists()
    assert not (failed / "published.pt").exists()


class _FinalLabels:
    """The datastore as the trainer uses it: the final-labelled images."""

    def __init__(self, root: Path):
        self.root = root

    def datalist(self) -> list[dict[str, str]]:
        labels = sorted((self.root / "labels" / "final").glob("*.nii.gz"))
        return [{"image": str(self.root / p.name), "label": str(p)} for p in labels]


def _studies(root: Path, n: int, broken: int | None = None) -> _FinalLabels:
    (root / "labels" / "final").mkdir(parents=True)
    geometry = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    for seed in range(n):
        frames, label = learnable_volume(seed, shape=(12, 48, 48))
        write_image(frames.astype(np.int16), root / f"case{seed}.nii.gz", **geometry)
        if seed == broken:
            label = label[:-1]  # one slice short: the study cannot be loaded
        write_image(label, root / "labels" / "final" / f"case{seed}.nii.gz", **geometry)
    return _FinalLabels(root)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_multi_gpu_request_trains_on_two_cpu_ranks(tmp_path, monkeypatch):
    config = small_config_file(tmp_path, SIZE)
    torch.manual_seed(0)
    ckpt = tmp_path / "random_small.pt"
    save_checkpoint(build_model(config), ckpt)
    published = tmp_path / "model" / "finetuned.pt"
    provider = ModelProvider(resolve_checkpoint(str(ckpt), config=config), torch.device("cpu"), None, published)
    stats = tmp_path / "model" / "train_stats.json"
    trainer = MedSAM2Trainer(provider, parse_window("128,256"), stats, TrainSettings())
    assert trainer.config()["multi_gpu"] is False and trainer.config()["gpus"] == "all"
    request = {"multi_gpu": True, "gpus": "all", "epochs": 1, "steps_per_epoch": 2, "clip_length": 3}
    request.update(max_objects=2, lr=3e-3, grad_clip=1.0, p_box=1.0, val_fraction=0.34)
    request.update(publish_max_overlap_rise=1.0)  # random weights: see test_crash_safety.PUBLISHING_RUN

    # GPUs that are not there: a clear request error before anything starts
    with pytest.raises(MONAILabelException, match="gpus"):
        trainer({**request, "gpus": "0,1"}, _studies(tmp_path / "none", 1))

    monkeypatch.setenv(CPU_RANKS_ENV, "2")
    # a study that cannot be loaded: both ranks end, the run is FAILED, nothing is published
    with pytest.raises(ProcessRaisedException, match="label shape"):
        trainer(request, _studies(tmp_path / "broken", 3, broken=1))
    failed = json.loads(stats.read_text())
    assert failed["status"] == "FAILED" and "label shape" in failed["error"] and failed["world_size"] == 2
    assert not published.exists() and not list(published.parent.glob(".*.part"))

    result = trainer(request, _studies(tmp_path / "ok", 3))
    assert result == json.loads(stats.read_text())
    assert result["status"] == "DONE" and result["world_size"] == 2 and result["devices"] == ["cpu", "cpu"]
    assert result["train_studies"] == ["case0.nii.gz", "case1.nii.gz"] and result["val_studies"] == ["case2.nii.gz"]
    (epoch,) = result["epochs"]
    assert np.isfinite(epoch["train_loss"]) and 0 <= epoch["val_dice"] <= 1 and epoch["slices_per_second"] > 0
    assert result["published"] == epoch["best"] == published.exists()
    if result["published"]:
        assert load_model(provider.source()) is not None  # strict load, as the inferers do
    assert not list(published.parent.glob(".*.part"))
