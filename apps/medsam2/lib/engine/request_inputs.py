"""What a 2D or 3D request starts from: the label it refines (an uploaded or saved label file, or the session's
last answer), its prompts (sent, or scribbles painted into the label file), each prompt as SAM2 takes it, and the
part of the answer JSON both kinds of answer share."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from lib.engine.image_sessions import ImageSession
from lib.engine.mask_prompts import merge_strokes, resolve_drawn
from lib.engine.model_provider import ModelProvider
from lib.engine.prompts import KeySlicePrompt, ParsedRequest, parse_prompts, roi_slice_range, slice_shape
from lib.engine.propagation import upsample_logits
from lib.engine.refine import BaseLabel, DecodedLabel, LabelFile, decode_label, painted_prompts
from lib.engine.request import SegmentRequest
from lib.engine.volume_session import frames_along_axis
from lib.errors import PromptError
from lib.imaging.volume_io import load_label_on


def decode_label_file(
    session: ImageSession, request: SegmentRequest, label_file: LabelFile | None, axis: int
) -> DecodedLabel | None:
    """The label file a request starts from (upload or datastore), read on the image's grid."""
    if label_file is None:
        return None
    values = load_label_on(label_file.path, session.image.reference, f"{label_file.source} label")
    target = request.labels.resolve(request.target_label)
    return decode_label(frames_along_axis(values, axis), label_file, request.labels, target)


def last_answer_base(session: ImageSession, request: SegmentRequest, axis: int, undo_levels: int) -> BaseLabel | None:
    """``refine_from: "last"``: the session's current answer as the base label."""
    if not request.refine_last:
        return None
    history = session.undo_history(undo_levels)
    if history.current.answer is None:
        raise PromptError("refine_from 'last': this session has no answer on this image yet.", status=404)
    return BaseLabel(frames_along_axis(history.current.label(session.image.array.shape), axis), "last answer")


def key_slice_prompts(
    request: SegmentRequest, shape: tuple[int, ...], decoded: DecodedLabel | None, axis: int = 2
) -> ParsedRequest:
    """Prompts from the request's JSON or viewer form, plus one per slice with painted scribbles."""
    painted = decoded is not None and decoded.has_scribbles
    sent = request.sends_prompts
    if decoded is not None and not painted and not sent:
        raise PromptError(
            f"The {decoded.source} label holds no scribbles (foreground_scribbles, background_scribbles) and the "
            "request no prompt: paint scribbles on a key slice, or send prompts with the label."
        )
    if sent or not painted:
        parsed = parse_prompts(request, shape, axis)
    else:  # a scribbles request (Slicer): its ROI bounds the slices to recompute, it is not a box
        parsed = ParsedRequest([], axis, roi_slice_range(request.roi, shape, axis))
    if painted:
        assert decoded is not None
        parsed.prompts = _merge_same_slice(parsed.prompts + _painted(request, shape, decoded, axis, parsed))
    if not parsed.prompts:
        raise PromptError("The uploaded label holds no scribbles on the slices this request covers.")
    if request.dimension == 2 and len({p.slice_index for p in parsed.prompts}) > 1:
        raise PromptError("The 2D model segments one slice per request; send 'slice' or scribble on one slice.")
    return parsed


def _painted(
    request: SegmentRequest, shape: tuple[int, ...], decoded: DecodedLabel, axis: int, parsed: ParsedRequest
) -> list[KeySlicePrompt]:
    """One prompt per slice holding painted scribbles (in 2D, on the requested slice only)."""
    name, value = request.labels.resolve(request.target_label)
    n_slices, rows, cols = slice_shape(shape, axis)
    empty = np.zeros((n_slices, rows, cols), dtype=bool)
    fg = decoded.foreground if decoded.foreground is not None else empty
    bg = decoded.background if decoded.background is not None else empty
    painted_on = painted_prompts(fg, bg, name, value, parsed.slice_range)
    if request.dimension == 2 and request.key_slice is not None:
        painted_on = [p for p in painted_on if p.slice_index == request.key_slice]
    return painted_on


def sam2_prompt(
    prompt: KeySlicePrompt,
    base: BaseLabel | None,
    scribble_mode: str,
    rows: int,
    cols: int,
    previous: torch.Tensor | None = None,
) -> KeySlicePrompt:
    """The prompt as SAM2 takes it, refining the base label's mask on its slice, or (a correction made of
    strokes only) the mask the last answer had there (``previous``, low-res logits). Background prompts alone
    are taken only where there is something to remove: the base holds the label, or the last answer had it."""
    mask = None
    if base is not None:
        mask = base.slice_mask(prompt.label_value, prompt.slice_index)
        mask = mask if mask.any() else None
    if mask is None and previous is not None and not prompt.has_clicks_or_box():
        mask = (upsample_logits(previous[None, None], rows, cols)[0] > 0).cpu().numpy()
    refining = (base is not None and base.holds(prompt.label_value)) or previous is not None
    return resolve_drawn(prompt, mask, scribble_mode, rows, cols, refining=refining)


def answer_json(
    session: ImageSession, parsed: ParsedRequest, reused: bool, request: SegmentRequest, provider: ModelProvider
) -> dict[str, Any]:
    """What every answer says: the prompts as the model saw them, notes, labels, image, window, model, session."""
    ckpt = provider.checkpoint
    image = session.image
    return {
        "prompts": [p.as_json(parsed.axis) for p in parsed.prompts],
        "notes": parsed.notes,
        "label_names": dict(request.labels.by_name),
        "image": {"shape_ijk": list(image.array.shape[::-1]), "spacing": list(image.spacing)},
        "window": session.window.describe(),
        "model": {"checkpoint": ckpt.name, "random_weights": ckpt.is_random, "device": str(provider.device)},
        "session": {
            "reused": reused,
            "slices_encoded_total": session.volume.slices_encoded,
            "encoded_ahead": session.volume.slices_encoded_ahead,
        },
    }


def _merge_same_slice(prompts: list[KeySlicePrompt]) -> list[KeySlicePrompt]:
    """One prompt per label and slice: clicks, boxes and strokes given twice for one slice are combined."""
    merged: dict[tuple[str, int], KeySlicePrompt] = {}
    for p in prompts:
        key = (p.label, p.slice_index)
        old = merged.get(key)
        merged[key] = (
            p
            if old is None
            else dataclasses.replace(
                old,
                box=old.box or p.box,
                points=old.points + p.points,
                point_labels=old.point_labels + p.point_labels,
                strokes=merge_strokes(old.strokes, p.strokes),
            )
        )
    return list(merged.values())
