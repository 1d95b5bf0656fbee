"""SAM2's image encoder compiled by OpenVINO for the CPU it runs on (bf16 on CPUs with native bf16).

``bench/cpu_paths.py`` measured every CPU option for the encoder against PyTorch's bf16 autocast on 2 cores:
torch.compile, int8 dynamic quantisation, ONNX Runtime and OpenVINO; OpenVINO won (about 1.6x, mask Dice 0.996
against fp32). :func:`use_openvino_image_encoder` replaces ``model.forward_image`` of one model instance (the
served one) with the compiled encoder; everything else, training included, keeps SAM2's modules.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)


class _EncoderLevels(torch.nn.Module):
    """What ``SAM2Base.forward_image`` computes, as a tuple of feature levels (trunk, neck, the mask decoder's
    conv_s0/conv_s1 on the two high-resolution levels)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.image_encoder = model.image_encoder
        self.conv_s0 = model.sam_mask_decoder.conv_s0
        self.conv_s1 = model.sam_mask_decoder.conv_s1

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fpn = self.image_encoder(images)["backbone_fpn"]
        return (self.conv_s0(fpn[0]), self.conv_s1(fpn[1]), *fpn[2:])


class OpenVinoImageEncoder:
    """A drop-in ``forward_image``: (B, 3, S, S) float images -> SAM2's backbone dict (float32 tensors)."""

    def __init__(self, model: torch.nn.Module):
        import openvino as ov

        if not model.use_high_res_features_in_sam:
            raise ValueError("the OpenVINO encoder reproduces forward_image for high-resolution-feature models only")
        size = int(model.image_size)
        module = _EncoderLevels(model).eval()
        example = torch.zeros(1, 3, size, size)
        t0 = time.perf_counter()
        converted = ov.convert_model(module, example_input=example, input=[ov.PartialShape([-1, 3, size, size])])
        self.compiled = ov.compile_model(converted, "CPU")
        self.seconds_to_compile = time.perf_counter() - t0
        self.position_encoding = model.image_encoder.neck.position_encoding
        self._pos: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _positions(self, level: torch.Tensor) -> torch.Tensor:
        key = tuple(level.shape[1:])
        with self._lock:
            if key not in self._pos:  # the sine encodings depend on the shape only
                self._pos[key] = self.position_encoding(level[:1]).float()
            return self._pos[key].expand(level.shape[0], -1, -1, -1)

    def __call__(self, images: torch.Tensor) -> dict:
        request = self.compiled.create_infer_request()  # one per call: calls may come from several threads
        outputs = request.infer(np.ascontiguousarray(images.detach().float().cpu().numpy()))
        levels = [torch.from_numpy(np.array(outputs[o])) for o in self.compiled.outputs]
        return {
            "vision_features": levels[-1],
            "vision_pos_enc": [self._positions(level) for level in levels],
            "backbone_fpn": levels,
        }


def use_openvino_image_encoder(model: torch.nn.Module) -> OpenVinoImageEncoder | None:
    """Serve this model's ``forward_image`` from OpenVINO; None (SAM2's encoder kept, reason logged) when OpenVINO
    is missing or cannot convert this model."""
    try:
        encoder = OpenVinoImageEncoder(model)
    except Exception as e:  # any failure leaves SAM2's own encoder in place
        logger.warning("OpenVINO image encoder not used (%s: %s); SAM2's encoder runs instead", type(e).__name__, e)
        return None
    model.forward_image = encoder
    logger.info("Image encoder compiled by OpenVINO in %.1f s", encoder.seconds_to_compile)
    return encoder


def uses_openvino_image_encoder(model: torch.nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward_image"), OpenVinoImageEncoder)
