"""Which CPU execution path runs this app's SAM2 image encoder and tracking step fastest, at which mask agreement.

One process, the MedSAM2 shape (hiera-t, 512 input) with random weights, a synthetic CT volume with one box on
its middle slice. Every option is timed against today's path (eager PyTorch under bf16 autocast, the engine's
``VolumeSession.encode`` and ``propagate_volume``) measured right beside it: today and the option alternate,
3 repeats each, the min of each counts; ratio = today_seconds / option_seconds (> 1: the option is faster).
Warm-up (first call: compilation, export, conversion) is reported apart (``setup_s``, ``warmup_s``).

Agreement with the fp32 reference: for the encoder, the cosine similarity of each ``backbone_fpn`` level with
eager fp32, and the Dice of the final 3D mask when the option's encoder feeds the engine (fp32 tracking) against
the fp32 engine; for the tracking step, the Dice of the final 3D mask against fp32 tracking on the same cached
fp32 features. An option "holds the bound" when that Dice is >= 0.99.

    python bench/cpu_paths.py                                   # everything, appends to bench/results/...
    python bench/cpu_paths.py --options enc_fp32,track_fp32 --out /tmp/x.jsonl

OpenVINO is in requirements.txt (the app uses it: lib/engine/openvino_encoder.py); the ONNX Runtime options need
``pip install onnxruntime==1.31.1 onnx==1.23.2 onnxscript==0.7.2 numpy==1.26.4 torch==2.14.1`` first (numpy
and torch repeated so that pip keeps them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import REPO, use_repo_paths

use_repo_paths()

from propagation_speed import object_boxes, synthetic_ct  # noqa: E402

from lib.engine import cpu_inference  # noqa: E402
from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model  # noqa: E402
from lib.engine.preprocessing import frames_to_model_input, parse_window, to_uint8  # noqa: E402
from lib.engine.prompts import KeySlicePrompt  # noqa: E402
from lib.engine.propagation import PropagationResult, propagate_volume  # noqa: E402
from lib.engine.volume_session import VolumeSession  # noqa: E402
from sam2_testing import object_present_bias  # noqa: E402

BF16 = torch.bfloat16
ENCODE_BATCH = 8
REPEATS = 3
DICE_BOUND = 0.99
EncoderFn = Callable[[torch.Tensor], dict]

ENCODER_OPTIONS = [
    "enc_fp32",
    "enc_threads1",
    "enc_compile",
    "enc_compile_max_autotune",
    "enc_int8_dynamic",
    "enc_int8_dynamic_bf16_autocast",
    "enc_onnxruntime_fp32",
    "enc_onnxruntime_int8",
    "enc_openvino_default",
    "enc_openvino_f32",
]
TRACK_OPTIONS = [
    "track_fp32",
    "track_threads1",
    "track_compile_memattn",
    "track_compile_forward",
    "track_int8_dynamic",
    "track_int8_dynamic_bf16_autocast",
    "track_openvino_memattn_default",
    "track_openvino_memattn_f32",
    "track_onnxruntime_memattn",
    "track_explicit_attention",
    "track_cpu_inference_modules",
]


# ----------------------------------------------------------------------------------------------- common helpers


@dataclass
class Bench:
    """The model, the volume and its prompt, the fp32 references, and where results go."""

    model: torch.nn.Module
    frames: np.ndarray
    prompt: KeySlicePrompt
    batch: torch.Tensor  # (8, 3, size, size) model input: the first encoder batch of the volume
    out: Path
    base: dict
    ref_fpn: list[torch.Tensor] = field(default_factory=list)
    ref_mask: np.ndarray | None = None
    fp32_session: VolumeSession | None = None
    results: list[dict] = field(default_factory=list)

    def emit(self, line: dict) -> None:
        """Print one JSON line and append it to the results file."""
        line = {**line, **self.base, "loadavg_1m": round(os.getloadavg()[0], 2)}
        self.results.append(line)
        text = json.dumps(line)
        print(text, flush=True)
        with open(self.out, "a") as f:
            f.write(text + "\n")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else round(2.0 * int((a & b).sum()) / total, 5)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return round(float(a @ b / (a.norm() * b.norm())), 6)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def alternate(today: Callable[[], float], option: Callable[[], float]) -> tuple[float, float]:
    """Min seconds of today's path and of the option, run alternately ``REPEATS`` times each."""
    t_today, t_option = [], []
    for _ in range(REPEATS):
        t_today.append(today())
        t_option.append(option())
    return min(t_today), min(t_option)


CPU_MODULE_OPTIONS = {
    "track_explicit_attention": "use_explicit_memory_attention",
    "track_cpu_inference_modules": "use_cpu_inference_modules",
}


# --------------------------------------------------------------------------------------------------- encoder


class EncoderFpn(torch.nn.Module):
    """``forward_image``'s feature levels (trunk + neck + the decoder's conv_s0/s1) as a tuple, for export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.image_encoder = model.image_encoder
        self.conv_s0 = model.sam_mask_decoder.conv_s0
        self.conv_s1 = model.sam_mask_decoder.conv_s1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.image_encoder(x)["backbone_fpn"]
        return self.conv_s0(fpn[0]), self.conv_s1(fpn[1]), fpn[2]


def backbone_out(model: torch.nn.Module, fpn: list[torch.Tensor]) -> dict:
    """The dict ``forward_image`` returns, from the three feature levels (position encodings recomputed)."""
    pe = model.image_encoder.neck.position_encoding
    pos = [pe(f).to(f.dtype) for f in fpn]
    return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": list(fpn)}


def eager_encoder(model: torch.nn.Module, dtype: torch.dtype | None, n_threads: int = 0) -> EncoderFn:
    """``model.forward_image`` under bf16 autocast (``dtype``) or fp32, optionally with ``n_threads`` threads."""
    forward = model.forward_image  # bound now: the engine runs swap the attribute

    def run(x: torch.Tensor) -> dict:
        with threads(n_threads) if n_threads else nullcontext():
            with torch.autocast("cpu", dtype=BF16, enabled=dtype is not None):
                return forward(x)

    return run


def compiled_encoder(model: torch.nn.Module, mode: str | None) -> EncoderFn:
    """``torch.compile`` (inductor) of ``forward_image`` under bf16 autocast."""
    compiled = torch.compile(model.forward_image, mode=mode)

    def run(x: torch.Tensor) -> dict:
        with torch.autocast("cpu", dtype=BF16):
            return compiled(x)

    return run


def int8_encoder(model: torch.nn.Module, autocast: bool) -> EncoderFn:
    """The image encoder's Linear layers dynamically quantised to int8 (a copy), fp32 or bf16-autocast activations."""
    quant = copy.deepcopy(model)
    quant.image_encoder = torch.ao.quantization.quantize_dynamic(quant.image_encoder, {torch.nn.Linear}, torch.qint8)
    return eager_encoder(quant, BF16 if autocast else None)


def padded_runner(model: torch.nn.Module, run_np: Callable[[np.ndarray], list[np.ndarray]]) -> EncoderFn:
    """An encoder from a fixed-batch numpy runner: pads a short batch to ``ENCODE_BATCH``, returns torch tensors."""

    def run(x: torch.Tensor) -> dict:
        n = x.shape[0]
        arr = x.float().numpy()
        if n < ENCODE_BATCH:
            arr = np.concatenate([arr, np.zeros((ENCODE_BATCH - n, *arr.shape[1:]), arr.dtype)])
        outs = [torch.from_numpy(np.asarray(o)[:n]) for o in run_np(arr)]
        return backbone_out(model, outs)

    return run


def export_onnx(module: torch.nn.Module, args: tuple, path: str, names: list[str], outputs: int) -> None:
    """``torch.onnx.export`` with the TorchScript exporter (dynamo=False), static shapes, opset 17."""
    out_names = [f"out{i}" for i in range(outputs)]
    torch.onnx.export(module, args, path, dynamo=False, input_names=names, output_names=out_names, opset_version=17)


def ort_session(path: str) -> Any:
    """An onnxruntime CPU session with torch's thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def onnxruntime_encoder(model: torch.nn.Module, folder: str, int8: bool) -> EncoderFn:
    """The encoder exported to ONNX and run by onnxruntime (fp32, or int8 dynamic quantisation of its MatMuls)."""
    path = os.path.join(folder, "encoder.onnx")
    if not os.path.exists(path):
        export_onnx(EncoderFpn(model).eval(), (torch.zeros(ENCODE_BATCH, 3, 512, 512),), path, ["x"], 3)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q_path = os.path.join(folder, "encoder_int8.onnx")
        quantize_dynamic(path, q_path, weight_type=QuantType.QInt8)
        path = q_path
    session = ort_session(path)
    return padded_runner(model, lambda arr: session.run(None, {"x": arr}))


def openvino_encoder(model: torch.nn.Module, config: dict) -> EncoderFn:
    """The encoder converted by OpenVINO and compiled for its CPU plugin with ``config``."""
    import openvino as ov

    example = torch.zeros(ENCODE_BATCH, 3, model.image_size, model.image_size)
    compiled = ov.compile_model(ov.convert_model(EncoderFpn(model).eval(), example_input=example), "CPU", config)

    def run_np(arr: np.ndarray) -> list[np.ndarray]:
        result = compiled(arr)
        return [result[o] for o in compiled.outputs]

    return padded_runner(model, run_np)


def make_encoder(name: str, model: torch.nn.Module, folder: str) -> EncoderFn:
    """The encoder function of option ``name``."""
    if name == "enc_today":
        return eager_encoder(model, BF16)
    if name == "enc_fp32":
        return eager_encoder(model, None)
    if name == "enc_threads1":
        return eager_encoder(model, BF16, n_threads=1)
    if name.startswith("enc_compile"):
        return compiled_encoder(model, "max-autotune-no-cudagraphs" if name.endswith("max_autotune") else None)
    if name.startswith("enc_int8_dynamic"):
        return int8_encoder(model, autocast=name.endswith("bf16_autocast"))
    if name.startswith("enc_onnxruntime"):
        return onnxruntime_encoder(model, folder, int8=name.endswith("int8"))
    if name.startswith("enc_openvino"):
        return openvino_encoder(model, {"INFERENCE_PRECISION_HINT": "f32"} if name.endswith("f32") else {})
    raise ValueError(f"unknown encoder option {name}")


@contextmanager
def encoder_swapped(model: torch.nn.Module, fn: EncoderFn) -> Iterator[None]:
    """``model.forward_image`` replaced by ``fn`` inside the block (so the engine encodes with the option)."""
    model.forward_image = fn
    try:
        yield
    finally:
        del model.forward_image


def engine_mask(bench: Bench, fn: EncoderFn) -> np.ndarray:
    """The final 3D mask of the engine with fp32 tracking, its slices encoded by ``fn``."""
    session = VolumeSession(bench.frames, bench.model, "cpu", None, torch.float32, ENCODE_BATCH)
    with encoder_swapped(bench.model, fn):
        with torch.inference_mode():
            session.encode(range(session.num_slices))
    return propagate_volume(session, [bench.prompt]).binary_mask(bench.prompt.label)


def encode_seconds(fn: EncoderFn, x: torch.Tensor) -> Callable[[], float]:
    """A timer of one batch through ``fn``, in seconds per slice."""

    def run() -> float:
        with torch.inference_mode():
            return timed(lambda: fn(x))[0] / x.shape[0]

    return run


def measure_encoder(bench: Bench, name: str, today: EncoderFn, folder: str) -> None:
    """Time one encoder option beside today's path; its feature cosines and engine Dice against fp32."""
    setup_s, fn = timed(lambda: make_encoder(name, bench.model, folder))
    with torch.inference_mode():
        warmup_s, out = timed(lambda: fn(bench.batch))
    t_today, t_opt = alternate(encode_seconds(today, bench.batch), encode_seconds(fn, bench.batch))
    fpn = [f.float() for f in out["backbone_fpn"]]
    mask_dice = dice(engine_mask(bench, fn), bench.ref_mask)
    bench.emit(
        {
            "stage": "encoder",
            "option": name,
            "status": "ok",
            "seconds_per_slice": round(t_opt, 4),
            "today_seconds_per_slice": round(t_today, 4),
            "ratio": round(t_today / t_opt, 3),
            "setup_s": round(setup_s, 2),
            "warmup_s": round(warmup_s, 2),
            "cosine_vs_fp32": [cosine(a, b) for a, b in zip(fpn, bench.ref_fpn, strict=True)],
            "dice_vs_fp32": mask_dice,
            "holds_bound": mask_dice >= DICE_BOUND,
        }
    )


# ---------------------------------------------------------------------------------------------------- tracking


class FixedMemoryAttention(torch.nn.Module):
    """SAM2's memory attention for one memory layout (number of pointer tokens fixed), plain tensors in, for
    export."""

    def __init__(self, inner: torch.nn.Module, num_obj_ptr_tokens: int):
        super().__init__()
        self.inner = inner
        self.num_obj_ptr_tokens = num_obj_ptr_tokens

    def forward(self, curr: torch.Tensor, curr_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor):
        return self.inner(
            curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
            num_obj_ptr_tokens=self.num_obj_ptr_tokens,
        )  # fmt: skip


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., L, D) with its (even, odd) channel pairs rotated by angles given as cos, sin (L, D / 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def real_rotary_enc(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor, repeat_freqs_k: bool = False):
    """SAM2's ``apply_rotary_enc`` in real arithmetic (exporters take no complex tensors); ``freqs_cis`` as
    ``torch.view_as_real`` of SAM2's, (L, D / 2, 2)."""
    cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]
    q = _rotate(xq, cos, sin).type_as(xq)
    if xk.shape[-2] == 0:
        return q, xk
    r = xk.shape[-2] // xq.shape[-2] if repeat_freqs_k else 1
    return q, _rotate(xk, cos.repeat(r, 1), sin.repeat(r, 1)).type_as(xk)


@contextmanager
def exportable(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block: no autocast, and the module's RoPE attention in real arithmetic (same values)."""
    from sam2.modeling.sam import transformer

    ropes = [m for m in module.modules() if isinstance(m, transformer.RoPEAttention)]
    saved = [m.freqs_cis for m in ropes]
    original = transformer.apply_rotary_enc
    try:
        for m in ropes:
            m.freqs_cis = torch.view_as_real(m.freqs_cis).clone()
        transformer.apply_rotary_enc = real_rotary_enc
        with torch.autocast("cpu", enabled=False):
            yield
    finally:
        transformer.apply_rotary_enc = original
        for m, freqs in zip(ropes, saved, strict=True):
            m.freqs_cis = freqs


class ExportedMemoryAttention(torch.nn.Module):
    """Stands in for ``model.memory_attention``: one exported and compiled runtime model per input layout."""

    def __init__(self, inner: torch.nn.Module, build: Callable[[torch.nn.Module, tuple], Callable]):
        super().__init__()
        self.inner = inner
        self.build = build
        self.runners: dict[tuple, Callable] = {}

    def forward(self, curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        args = tuple(t.float() for t in (curr[0], curr_pos[0], memory, memory_pos))
        key = (*(tuple(a.shape) for a in args), num_obj_ptr_tokens)
        if key not in self.runners:
            with exportable(self.inner):
                self.runners[key] = self.build(FixedMemoryAttention(self.inner, num_obj_ptr_tokens).eval(), args)
        return torch.from_numpy(np.asarray(self.runners[key](*(a.numpy() for a in args))))


OPENVINO_MODELS: dict[tuple, Any] = {}  # converted memory-attention models by input layout, shared by the options


def openvino_runner(config: dict) -> Callable[[torch.nn.Module, tuple], Callable]:
    """Builds an OpenVINO CPU runner of a module for these example inputs (the conversion cached by layout)."""

    def build(module: torch.nn.Module, args: tuple) -> Callable:
        import openvino as ov

        key = (*(tuple(a.shape) for a in args), module.num_obj_ptr_tokens)
        if key not in OPENVINO_MODELS:
            OPENVINO_MODELS[key] = ov.convert_model(module, example_input=args)
        compiled = ov.compile_model(OPENVINO_MODELS[key], "CPU", config)
        return lambda *arrays: compiled(list(arrays))[compiled.outputs[0]]

    return build


def onnxruntime_runner(folder: str) -> Callable[[torch.nn.Module, tuple], Callable]:
    """Builds an onnxruntime CPU runner of a module for these example inputs (exported to ONNX first)."""

    def build(module: torch.nn.Module, args: tuple) -> Callable:
        path = os.path.join(folder, f"memattn_{args[2].shape[0]}_{module.num_obj_ptr_tokens}_{args[0].shape[1]}.onnx")
        names = ["curr", "curr_pos", "memory", "memory_pos"]
        export_onnx(module, args, path, names, 1)
        session = ort_session(path)
        return lambda *arrays: session.run(None, dict(zip(names, arrays, strict=True)))[0]

    return build


@contextmanager
def compiled_tracker_forward() -> Iterator[None]:
    """``StaticTracker._forward`` (the whole tracking step) compiled by ``torch.compile`` inside the block."""
    from lib.engine.static_tracking import StaticTracker

    original = StaticTracker._forward
    compiled = torch.compile(original)
    StaticTracker._forward = lambda self, n_prev, n_ptr: compiled(self, n_prev, n_ptr)
    try:
        yield
    finally:
        StaticTracker._forward = original


def quantised_tracking(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with the memory attention's and mask decoder's Linear layers dynamically quantised to int8."""
    quant = copy.deepcopy(model)
    for name in ("memory_attention", "sam_mask_decoder"):
        module = getattr(quant, name)
        setattr(quant, name, torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, torch.qint8))
    return quant


def with_memory_attention(model: torch.nn.Module, wrap: Callable[[torch.nn.Module], torch.nn.Module]):
    """A copy of the model whose memory attention is ``wrap(original)``."""
    other = copy.deepcopy(model)
    other.memory_attention = wrap(other.memory_attention)
    return other


def switched_copy(model: torch.nn.Module, function: str) -> torch.nn.Module:
    """A copy of the model with ``lib.engine.cpu_inference``'s ``function`` applied."""
    other = copy.deepcopy(model)
    getattr(cpu_inference, function)(other)
    return other


@dataclass
class TrackOption:
    """How an option tracks: its model, its autocast dtype, its thread count, an extra context."""

    model: torch.nn.Module
    dtype: torch.dtype | None = BF16
    n_threads: int = 0
    context: Callable[[], Any] = nullcontext


def make_tracking(name: str, model: torch.nn.Module, folder: str) -> TrackOption:
    """The tracking set-up of option ``name``."""
    autocast = None if name in ("track_fp32", "track_int8_dynamic") else BF16  # the other modules' precision
    if name in ("track_today", "track_fp32", "track_threads1"):
        return TrackOption(model, autocast, 1 if name == "track_threads1" else 0)
    if name == "track_compile_memattn":
        return TrackOption(with_memory_attention(model, torch.compile), autocast)
    if name == "track_compile_forward":
        return TrackOption(copy.deepcopy(model), autocast, context=compiled_tracker_forward)
    if name.startswith("track_int8_dynamic"):
        return TrackOption(quantised_tracking(model), autocast)
    if name.startswith("track_openvino_memattn"):
        config = {"INFERENCE_PRECISION_HINT": "f32"} if name.endswith("f32") else {}
        build = openvino_runner(config)
        return TrackOption(with_memory_attention(model, lambda m: ExportedMemoryAttention(m, build)), autocast)
    if name.startswith("track_onnxruntime_memattn"):
        build = onnxruntime_runner(folder)
        return TrackOption(with_memory_attention(model, lambda m: ExportedMemoryAttention(m, build)), autocast)
    if name in CPU_MODULE_OPTIONS:
        return TrackOption(switched_copy(model, CPU_MODULE_OPTIONS[name]), autocast)
    raise ValueError(f"unknown tracking option {name}")


def propagate(bench: Bench, option: TrackOption) -> PropagationResult:
    """``propagate_volume`` on the cached fp32 features (no encoding), with the option's model and precision."""
    src = bench.fp32_session
    session = VolumeSession(bench.frames, option.model, "cpu", option.dtype, torch.float32, ENCODE_BATCH)
    session._features, session._pos_enc, session._feat_sizes = src._features, src._pos_enc, src._feat_sizes
    with threads(option.n_threads) if option.n_threads else nullcontext(), option.context():
        return propagate_volume(session, [bench.prompt])


def step_seconds(bench: Bench, option: TrackOption) -> Callable[[], float]:
    """A timer of one propagation, in seconds per tracking step."""
    return lambda: (lambda r: r.latencies["track"] / max(r.steps, 1))(propagate(bench, option))


def measure_tracking(bench: Bench, name: str, today: TrackOption, folder: str) -> None:
    """Time one tracking option beside today's path; its 3D mask's Dice against fp32 tracking."""
    setup_s, option = timed(lambda: make_tracking(name, bench.model, folder))
    warmup_s, result = timed(lambda: propagate(bench, option))
    t_today, t_opt = alternate(step_seconds(bench, today), step_seconds(bench, option))
    mask_dice = dice(result.binary_mask(bench.prompt.label), bench.ref_mask)
    bench.emit(
        {
            "stage": "tracking",
            "option": name,
            "status": "ok",
            "seconds_per_step": round(t_opt, 4),
            "today_seconds_per_step": round(t_today, 4),
            "ratio": round(t_today / t_opt, 3),
            "steps": result.steps,
            "setup_s": round(setup_s, 2),
            "warmup_s": round(warmup_s, 2),
            "warmup_includes": "a whole propagation (key slice + every step, so every memory layout)",
            "dice_vs_fp32": mask_dice,
            "holds_bound": mask_dice >= DICE_BOUND,
        }
    )


# ------------------------------------------------------------------------------------------------------- main


def setup(args: argparse.Namespace) -> Bench:
    """Model, volume, prompt, and the fp32 references (features of the first batch, engine mask, cached session)."""
    torch.manual_seed(0)
    model = object_present_bias(build_model(MEDSAM2_CONFIG, "cpu", []).eval())
    frames = to_uint8(synthetic_ct(args.slices, args.size), parse_window("abdomen"))
    prompt = KeySlicePrompt(label="a", label_value=1, slice_index=args.slices // 2, box=object_boxes(args.size)[0])
    batch = frames_to_model_input(frames[:ENCODE_BATCH], model.image_size, "cpu")
    base = {
        "model": "hiera-t 512 (MedSAM2 shape, random weights)",
        "volume": list(frames.shape),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    bench = Bench(model, frames, prompt, batch, Path(args.out), base)
    with torch.inference_mode():
        bench.ref_fpn = [f.float() for f in model.forward_image(batch)["backbone_fpn"]]
    bench.fp32_session = VolumeSession(frames, model, "cpu", None, torch.float32, ENCODE_BATCH)
    result = propagate_volume(bench.fp32_session, [prompt])
    bench.ref_mask = result.binary_mask(prompt.label)
    return bench


def run_option(bench: Bench, name: str, folder: str, todays: dict) -> None:
    """Measure one option, or record why it failed or was not run."""
    try:
        if name.startswith("enc_"):
            measure_encoder(bench, name, todays["encoder"], folder)
        else:
            measure_tracking(bench, name, todays["tracking"], folder)
    except Exception as exc:  # an option that does not export, compile or run is a result too
        stage = "encoder" if name.startswith("enc_") else "tracking"
        bench.emit({"stage": stage, "option": name, "status": "failed", "why": f"{type(exc).__name__}: {exc}"[:600]})


def summary(bench: Bench) -> dict:
    """Per stage, the fastest option holding the Dice bound (today's path counts, at ratio 1)."""
    best = {}
    for stage in ("encoder", "tracking"):
        ok = [r for r in bench.results if r.get("stage") == stage and r.get("status") == "ok" and r["holds_bound"]]
        if ok:
            top = max(ok, key=lambda r: r["ratio"])
            best[stage] = {"option": top["option"], "ratio": top["ratio"], "dice_vs_fp32": top["dice_vs_fp32"]}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=16, help="slices of the synthetic volume")
    ap.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    ap.add_argument("--options", default="", help="comma list of options to run (default: all): " + ", ".join(
        ["enc_today", "track_today", *ENCODER_OPTIONS, *TRACK_OPTIONS]))  # fmt: skip
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu_paths_cpu.jsonl"), help="JSONL to append")
    args = ap.parse_args()
    chosen = [o for o in args.options.split(",") if o] or ["enc_today", "track_today", *ENCODER_OPTIONS, *TRACK_OPTIONS]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = setup(args)
    todays = {"encoder": eager_encoder(bench.model, BF16), "tracking": TrackOption(bench.model, BF16)}
    with tempfile.TemporaryDirectory() as folder:
        for name in chosen:
            run_option(bench, name, folder, todays)
    bench.emit({"summary": summary(bench), "wall_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
