"""Checkpoint names, official download URLs, model configs, and the strict loader.

No MONAI Label imports: this module is used by the app, the trainer, the tests and bench/.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import sam2
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lib.atomic_files import atomic_write, remove_stale_temp_files, temp_pattern
from lib.errors import ModelUnavailable

logger = logging.getLogger(__name__)

APP_MODEL_DIR = Path(__file__).resolve().parents[2] / "model"
MEDSAM2_CONFIG = APP_MODEL_DIR / "configs" / "sam2.1_hiera_t512.yaml"
_SAM2_CONFIGS = Path(sam2.__file__).resolve().parent / "configs" / "sam2.1"

MEDSAM2_REPO = "wanglab/MedSAM2"  # on the Hugging Face Hub, downloaded with huggingface_hub
_MEDSAM2_HUB = f"https://huggingface.co/{MEDSAM2_REPO}/resolve/main/"
_HUB_URL = re.compile(
    r"https://huggingface\.co/(?P<repo>[\w.-]+/[\w.-]+)/resolve/(?P<revision>[\w.-]+)/(?P<file>[\w./-]+)"
)
# "<sha256>  <file name>" lines (sha256sum's format): the hash each known checkpoint must have before its first load
PINNED_HASHES_FILE = APP_MODEL_DIR / "checkpoints.sha256"
_SAM21_HUB = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

RANDOM = "random"
MEDSAM2_LICENCE = "CC-BY-SA-4.0"  # the MedSAM2 weights (wanglab/MedSAM2 on Hugging Face)
SAM21_LICENCE = "Apache-2.0"  # the SAM 2.1 weights (facebookresearch/sam2)
UNKNOWN_LICENCE = "unknown"  # a file or URL given by the administrator
RANDOM_LICENCE = "none (random weights)"


@dataclass(frozen=True)
class CheckpointSpec:
    """A known checkpoint: its file name, official URL and the model config it needs."""

    name: str
    filename: str
    url: str
    config: Path
    licence: str


KNOWN_CHECKPOINTS: dict[str, CheckpointSpec] = {
    **{
        name: CheckpointSpec(name, f"{name}.pt", f"{_MEDSAM2_HUB}{name}.pt", MEDSAM2_CONFIG, MEDSAM2_LICENCE)
        for name in (
            "MedSAM2_latest",
            "MedSAM2_2411",
            "MedSAM2_CTLesion",
            "MedSAM2_MRI_LiverLesion",
            "MedSAM2_US_Heart",
        )
    },
    **{
        f"sam2.1_hiera_{size}": CheckpointSpec(
            f"sam2.1_hiera_{size}",
            f"sam2.1_hiera_{size}.pt",
            f"{_SAM21_HUB}sam2.1_hiera_{size}.pt",
            _SAM2_CONFIGS / f"sam2.1_hiera_{cfg}.yaml",
            SAM21_LICENCE,
        )
        for size, cfg in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
    },
}
DEFAULT_CHECKPOINT = "MedSAM2_latest"

# The same post-processing switches that sam2.build_sam.build_sam2_video_predictor applies.
VIDEO_PREDICTOR_OVERRIDES = [
    "model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
    "model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "model.binarize_mask_from_pts_for_mem_enc=true",
    "model.fill_hole_area=8",
]


class CheckpointError(ModelUnavailable, RuntimeError):
    """A checkpoint cannot be found, downloaded or loaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the weights come from (``path`` is None for random weights), which config builds the model, and
    the licence of the weights (``/info`` shows it)."""

    name: str
    config: Path
    path: Path | None
    url: str | None = None
    licence: str = UNKNOWN_LICENCE

    @property
    def is_random(self) -> bool:
        return self.path is None


def resolve_checkpoint(
    spec: str, model_dir: Path = APP_MODEL_DIR, config: str | Path | None = None
) -> ResolvedCheckpoint:
    """Map ``--conf checkpoint`` (a known name, ``random``, a file path or a URL) to a config and a file.

    Nothing is downloaded here; see :func:`ensure_checkpoint_file`.
    ``config`` overrides the model config (a YAML path); otherwise known names use their own config and
    unknown files/URLs use the MedSAM2 (hiera-t 512) config.
    """
    spec = (spec or DEFAULT_CHECKPOINT).strip()
    cfg_override = Path(config) if config else None
    if spec == RANDOM:
        return ResolvedCheckpoint(RANDOM, cfg_override or MEDSAM2_CONFIG, None, licence=RANDOM_LICENCE)
    key = spec[:-3] if spec.endswith(".pt") and spec[:-3] in KNOWN_CHECKPOINTS else spec
    if key in KNOWN_CHECKPOINTS:
        known = KNOWN_CHECKPOINTS[key]
        path = model_dir / known.filename
        return ResolvedCheckpoint(known.name, cfg_override or known.config, path, known.url, known.licence)
    if spec.startswith(("http://", "https://")):
        filename = os.path.basename(spec.split("?")[0]) or "checkpoint.pt"
        return ResolvedCheckpoint(filename, cfg_override or MEDSAM2_CONFIG, model_dir / filename, spec)
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists() and (model_dir / path).exists():
        path = model_dir / path
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint '{spec}' is neither a known name ({', '.join(KNOWN_CHECKPOINTS)}, {RANDOM}), "
            f"a URL, nor an existing file."
        )
    return ResolvedCheckpoint(path.stem, cfg_override or MEDSAM2_CONFIG, path.resolve())


def download_file(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` with a progress bar, through a temporary file renamed into place."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as tmp_name, open(tmp_name, "wb") as out:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {dest.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))


_VERIFIED: set[tuple] = set()  # (path, size, mtime) of the files checked in this process


def pinned_hashes(path: Path = PINNED_HASHES_FILE) -> dict[str, str]:
    """{file name: SHA-256} from ``path`` (sha256sum's format, ``#`` comments); {} when it does not exist."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    found = (re.fullmatch(r"([0-9a-f]{64})\s+\*?(\S+)", line.strip()) for line in lines if not line.startswith("#"))
    return {m.group(2): m.group(1) for m in found if m}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(resolved: ResolvedCheckpoint, expected: str = "") -> str | None:
    """Check the file against ``expected`` (``--conf checkpoint_sha256``), else the pinned hash of its name;
    :class:`CheckpointError` (one line: the file, both hashes, what to do) on a mismatch. Returns the hash it
    checked against (None: nothing pinned, a warning names the file's hash to pin)."""
    if resolved.path is None:
        return None
    expected = expected or pinned_hashes().get(resolved.path.name, "")
    st = resolved.path.stat()
    stamp = (str(resolved.path.resolve()), st.st_size, st.st_mtime_ns)
    if stamp in _VERIFIED:  # checked in this process already (the config, then the model loader)
        return expected or None
    actual = file_sha256(resolved.path)
    if not expected:
        logger.warning(
            "No SHA-256 is pinned for checkpoint %s; its SHA-256 is %s (pin it: --conf checkpoint_sha256 %s)",
            resolved.path,
            actual,
            actual,
        )
        _VERIFIED.add(stamp)
        return None
    if actual != expected:
        raise CheckpointError(
            f"Checkpoint {resolved.path} has SHA-256 {actual}, not the pinned {expected} (a truncated or altered "
            "download, or another file under that name): delete it and start again to download it anew, or place "
            "the right file there."
        )
    _VERIFIED.add(stamp)
    return expected


def _hub_download(repo: str, revision: str, filename: str, dest: Path, timeout: float) -> None:
    """One file of a Hugging Face Hub repository into ``dest``'s folder, through ``huggingface_hub`` (resumes an
    interrupted download; ``HF_ENDPOINT`` names a mirror, ``HF_HUB_OFFLINE=1`` forbids the network)."""
    from huggingface_hub import hf_hub_download

    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    path = hf_hub_download(
        repo_id=repo,
        filename=filename,
        revision=revision,
        local_dir=dest.parent,
        endpoint=os.environ.get("HF_ENDPOINT") or None,  # read now: a mirror set for this start
        local_files_only=offline,
    )
    if Path(path).resolve() != dest.resolve():
        os.replace(path, dest)


def _hub_source(resolved: ResolvedCheckpoint) -> tuple[str, str, str] | None:
    """(repository, revision, file) when the checkpoint's URL is on the Hugging Face Hub."""
    match = _HUB_URL.fullmatch(resolved.url or "")
    return (match["repo"], match["revision"], match["file"]) if match else None


def _why(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}"


def ensure_checkpoint_file(resolved: ResolvedCheckpoint, timeout: float = 30.0, expected_sha256: str = "") -> None:
    """Download a named/URL checkpoint once (Hugging Face Hub files through ``huggingface_hub``), then check its
    SHA-256 before it is loaded; raise :class:`CheckpointError` (one line: what failed and what to do)."""
    if resolved.path is None:
        return
    if not resolved.path.exists():
        if not resolved.url:
            raise CheckpointError(f"Checkpoint file {resolved.path} does not exist.")
        hub = _hub_source(resolved)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hub else resolved.url
        logger.info("Downloading checkpoint %s from %s", resolved.name, endpoint)
        try:
            if hub:
                _hub_download(*hub, resolved.path, timeout)
            else:
                download_file(resolved.url, resolved.path, timeout=timeout)
        except Exception as e:  # the hub library's errors, network errors, a full disk: one line either way
            offline = " (HF_HUB_OFFLINE is set)" if hub and os.environ.get("HF_HUB_OFFLINE") else ""
            raise CheckpointError(
                f"Could not download checkpoint '{resolved.name}' from {endpoint}{offline} ({_why(e)}). If this "
                f"machine is offline, download {resolved.url} elsewhere and place it at {resolved.path} , or set "
                "HF_ENDPOINT to a mirror, then start the server again (or pass --conf checkpoint /path/to/file.pt)."
            ) from e
    verify_checkpoint(resolved, expected_sha256)


def image_size_overrides(image_size: int) -> list[str]:
    """Config overrides for another input size (the memory attention's RoPE grid follows: size / 16)."""
    grid = image_size // 16
    return [
        f"model.image_size={image_size}",
        f"model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    ]


def build_model(
    config: Path, device: str | torch.device = "cpu", extra_overrides: list[str] | None = None
) -> torch.nn.Module:
    """Instantiate a SAM2 video model (random weights) from a config YAML file."""
    cfg = OmegaConf.load(config)
    overrides = OmegaConf.from_dotlist(VIDEO_PREDICTOR_OVERRIDES + list(extra_overrides or []))
    cfg = OmegaConf.merge(cfg, overrides)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    return model.to(device)


def load_state_dict_strict(model: torch.nn.Module, path: Path) -> None:
    """Load ``{"model": state_dict}`` from ``path`` strictly; raise :class:`CheckpointError` on any mismatch."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or non-torch file
        raise CheckpointError(f"Checkpoint {path} cannot be read ({type(e).__name__}: {e}).") from e
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"Checkpoint {path} is not in the SAM2 format {{'model': state_dict}}.")
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {path} does not match the model config: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            f"Check that --conf checkpoint and --conf model_config belong together."
        )


def save_checkpoint(model: torch.nn.Module, path: Path, extra: dict | None = None) -> None:
    """Write ``{"model": state_dict}`` atomically and durably (temporary file in the same folder, fsync, rename):
    a reader or a process killed meanwhile sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path, pause_at="checkpoint_publish_before_replace") as tmp_name:
        torch.save({"model": state, **(extra or {})}, tmp_name)


def remove_unfinished_checkpoint_writes(path: Path | None) -> list[Path]:
    """Delete the temporary files that a process killed while writing (or downloading) ``path`` left."""
    return remove_stale_temp_files(path.parent, temp_pattern(path)) if path is not None else []


def load_model(resolved: ResolvedCheckpoint, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """Build the model for ``resolved`` and load its weights strictly (random weights: seeded init)."""
    if resolved.is_random:
        logger.warning(
            "\n%s\n!!! MedSAM2: using RANDOM WEIGHTS (--conf checkpoint random). Masks are meaningless. !!!\n"
            "!!! Use this for development and CI only.                                             !!!\n%s",
            "!" * 90,
            "!" * 90,
        )
        torch.manual_seed(seed)
        model = build_model(resolved.config, "cpu")
    else:
        ensure_checkpoint_file(resolved)
        model = build_model(resolved.config, "cpu")
        load_state_dict_strict(model, resolved.path)  # type: ignore[arg-type]
    return model.to(device).eval()
