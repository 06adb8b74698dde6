"""Images and videos → Qwen2-VL ViT patches → visual tokens, and their 3-D M-RoPE positions.

The rules follow the official Lyra code (docs/authors-behaviour.md#image-and-video-rules,
docs/authors-behaviour.md#m-rope-positions):

- image: max side > R → max side R (NEAREST); a side < 28 → 28 (NEAREST); aspect > 200:1 → 180:1;
  then Qwen2-VL's image processor (smart_resize to multiples of 28 within min/max pixels, CLIP
  normalisation, 14×14 patches, each image repeated over the 2 temporal slots).
- video: qwen-vl-utils 0.0.8 `fetch_video` (the version current when Lyra was released) with the
  CLI's `total_pixels`, `min_pixels` and `max_frames`: frames sampled at 2 fps, an even count between
  4 and 16, picked uniformly; one size for every frame from a per-frame share of the pixel budget;
  then the image processor's normalisation, with consecutive frame pairs forming one temporal patch.

Deliberate differences, each a fix for an input the official code mishandles: EXIF orientation is
applied; transparency is composited on white (PIL's `convert("RGB")` exposes whatever colour hides
under transparent pixels); images under 4 px or over `MAX_IMAGE_PIXELS` are refused with a message;
videos with fewer frames than the sampler asks for use every frame instead of crashing.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from lyra_cli.errors import CheckpointError, InputError, setting
from lyra_cli.inputs import require_input_file

log = logging.getLogger(__name__)

# --- Qwen2-VL ViT geometry ------------------------------------------------------------------------
PATCH_SIZE = 14  # pixels per ViT patch side
MERGE_SIZE = 2  # the merger folds 2×2 patches into one LLM token
TEMPORAL_PATCH_SIZE = 2  # frames per temporal patch (an image is repeated to fill both)
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: processed sides are multiples of this
CHANNELS = 3

# --- image rules of `preprocess_image_qwen2vl` (docs/authors-behaviour.md#image-and-video-rules) ---
CLI_MAX_SIDE = 2880
EVAL_MAX_SIDE = 1920
TRAIN_MAX_SIDE = 2560  # the authors' training loader caps images here (CLI 2880, eval 1920)
MIN_SIDE = IMAGE_FACTOR  # sides below one merged patch are upscaled to it
MAX_ASPECT = 200  # smart_resize refuses longer/shorter ratios …
CLAMPED_ASPECT = 180  # … so Lyra squeezes such images to 180:1 first
# Qwen2-VL's released preprocessor_config.json (min 4 tokens, max 16384 tokens of 28×28 pixels).
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR  # 3136
MAX_PIXELS = 16384 * IMAGE_FACTOR * IMAGE_FACTOR  # 12845056
# CLIP normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), Qwen2-VL's values.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# --- input guards (ours) --------------------------------------------------------------------------
MIN_INPUT_SIDE = 4  # smaller images hold no picture worth upscaling: refuse them
PIL_BOMB_WARNING_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (warns above it)
MAX_IMAGE_PIXELS = 2 * PIL_BOMB_WARNING_PIXELS  # PIL refuses above this; we refuse from the header
# A video frame is decoded whole and up to 16 are kept before resizing: 8K UHD is the largest we accept.
MAX_VIDEO_FRAME_PIXELS = 7680 * 4320
# What a damaged image may raise from PIL beyond its own types (struct.error from short header fields,
# EOFError from truncated frames, MemoryError from sizes a corrupt header claims).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error, IndexError, TypeError)

# --- video rules: Lyra CLI's arguments to qwen-vl-utils (docs/authors-behaviour.md#image-and-video-rules) and
# qwen-vl-utils 0.0.8's defaults ---
VIDEO_TOTAL_PIXELS = IMAGE_FACTOR * IMAGE_FACTOR * 2048 * 32  # CLI budget for all frames together
TRAIN_VIDEO_TOTAL_PIXELS = 8192 * IMAGE_FACTOR * IMAGE_FACTOR  # training's budget
VIDEO_MIN_PIXELS = IMAGE_FACTOR * IMAGE_FACTOR * 4  # per frame
VIDEO_MAX_FRAMES = 16
VIDEO_FRAME_MAX_PIXELS = 768 * IMAGE_FACTOR * IMAGE_FACTOR  # per-frame cap whatever the budget
VIDEO_SAMPLE_FPS = 2.0
VIDEO_MIN_FRAMES = 4
FRAME_FACTOR = TEMPORAL_PATCH_SIZE  # frame counts are multiples of the temporal patch
# When the budget share falls below min_pixels, qwen-vl-utils still allows 5% above it.
VIDEO_MIN_PIXELS_SLACK = 1.05

PREPROCESSOR_CONFIG = "preprocessor_config.json"
VisualKind = Literal["image", "video"]


# ---------------------------------------------------------------------------------------------------
# Sizes


def smart_resize(
    height: int, width: int, *, factor: int = IMAGE_FACTOR, min_pixels: float, max_pixels: float
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with min_pixels ≤ h·w ≤ max_pixels, aspect kept.

    Qwen2-VL's rule: round each side to the nearest multiple; if the area is too large, scale both
    down by sqrt(area/max) and floor; if too small, scale up by sqrt(min/area) and ceil.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio above {MAX_ASPECT}: {width}×{height}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def lyra_image_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) after Lyra's three rules: cap the max side, lift sides to 28, clamp the aspect.

    With the official max sides (≤ 2880) the aspect clamp never fires: after the first two rules the
    ratio is at most 2880/28 ≈ 103. It matters only for `max_side` above 200·28 = 5600.
    """
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)
    if width / height > MAX_ASPECT:
        width = height * CLAMPED_ASPECT
    if height / width > MAX_ASPECT:
        height = width * CLAMPED_ASPECT
    return width, height


# ---------------------------------------------------------------------------------------------------
# Images


def load_image(path: Path | str, *, max_side: int = CLI_MAX_SIDE) -> Image.Image:
    """An RGB image from any file PIL reads, upright per EXIF, sized by Lyra's rules for `max_side`.

    Size limits are checked from the header, before any pixel is decoded.
    """
    path = require_input_file(path, "image")
    with _open_image_header(path) as header:
        _check_image_size(header.size, path)
        image = _decode_image(header, path)  # a copy: the file is closed after this block
    try:
        image = to_rgb(image)
    except _IMAGE_ERRORS as exc:  # a mode PIL cannot convert (a damaged header can claim any)
        raise InputError(f"image `{path}` has pixels lyra cannot convert to RGB: {exc}",
                         "re-export it as an 8-bit RGB JPEG or PNG") from exc  # fmt: skip
    size = lyra_image_size(*image.size, max_side=max_side)
    # NEAREST, as the official code: these resizes are coarse guards, the processor resizes after.
    return image if size == image.size else image.resize(size, resample=Image.Resampling.NEAREST)


def _open_image_header(path: Path) -> Image.Image:
    """PIL's lazy open: reads the header only. PIL's own bomb check is turned into our message."""
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; PIL's warning band would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise _too_large_error(path, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            f"`{path}` is not an image file PIL can read", "use a JPEG, PNG, WebP, BMP, GIF or TIFF image"
        ) from exc
    except _IMAGE_ERRORS as exc:  # PIL plugins report bad headers in these
        raise InputError(
            f"cannot read image `{path}`: {exc or type(exc).__name__}", "check that the file is a complete image"
        ) from exc


def _check_image_size(size: tuple[int, int], path: Path) -> None:
    width, height = size
    if min(width, height) < MIN_INPUT_SIDE:
        raise InputError(
            f"image `{path}` is too small ({width}×{height} px)",
            f"use an image at least {MIN_INPUT_SIDE} px on each side",
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large_error(path, f"{width}×{height} px")


def _too_large_error(path: Path, detail: str) -> InputError:
    return InputError(
        f"image `{path}` is too large to decode safely ({detail})",
        f"downscale it below {MAX_IMAGE_PIXELS // 1_000_000} megapixels; the model sees at most "
        f"{CLI_MAX_SIDE} px per side anyway",
    )


def _decode_image(image: Image.Image, path: Path) -> Image.Image:
    """Decoded pixels, upright per EXIF (phones store photos sideways); always a new image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return ImageOps.exif_transpose(image)
    except _IMAGE_ERRORS as exc:  # truncated or corrupt data
        raise InputError(
            f"image `{path}` is truncated or corrupt: {exc or type(exc).__name__}", "re-export or re-download the image"
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every PIL mode: transparency composited on white, 16-bit scaled to 8-bit."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I"):  # "I;16*" (16-bit PNG/TIFF) and "I": PIL would clip at 255
        levels = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Videos


def video_frame_count(total_frames: int, video_fps: float, *, max_frames: int = VIDEO_MAX_FRAMES) -> int:
    """How many frames qwen-vl-utils 0.0.8 samples: 2 per second, clamped to [4, max_frames], even.

    The official code raises when that exceeds the clip's frames; we take every frame instead
    (an even count, at least `VIDEO_MIN_FRAMES` by repeating frames of very short clips).
    """
    min_frames = math.ceil(VIDEO_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    wanted = total_frames / video_fps * VIDEO_SAMPLE_FPS
    n_frames = round(min(max(wanted, min_frames), max_frames) / FRAME_FACTOR) * FRAME_FACTOR
    if n_frames > total_frames:
        n_frames = max(min_frames, math.floor(total_frames / FRAME_FACTOR) * FRAME_FACTOR)
    return n_frames


def video_frame_indices(total_frames: int, n_frames: int) -> list[int]:
    """Uniform picks from first to last frame, rounded as qwen-vl-utils does (torch float32 linspace)."""
    return torch.linspace(0, total_frames - 1, n_frames).round().long().tolist()


def video_frame_max_pixels(n_frames: int, total_pixels: float, min_pixels: float) -> float:
    """Per-frame pixel cap: an even share of the budget per temporal patch, ≤ 768 tokens' worth."""
    share = total_pixels / n_frames * FRAME_FACTOR
    return max(min(VIDEO_FRAME_MAX_PIXELS, share), int(min_pixels * VIDEO_MIN_PIXELS_SLACK))


@dataclass(frozen=True)
class _VideoProbe:
    n_frames: int
    fps: float


def load_video_frames(
    path: Path | str,
    *,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> tuple[np.ndarray, float]:
    """Sampled, resized frames (T, H, W, 3) uint8 with T even and H, W multiples of 28, and the
    sampling rate in frames per second of the original clip (T / total_frames · video_fps).
    """
    path = require_input_file(path, "video")
    probe = _probe_video(path)
    n_frames = video_frame_count(probe.n_frames, probe.fps, max_frames=max_frames)
    frames, n_decoded = _decode_frames(path, video_frame_indices(probe.n_frames, n_frames))
    if n_decoded != probe.n_frames:  # packet count ≠ frame count (rare): sample again from the truth
        if n_decoded == 0:
            raise InputError(f"video `{path}` has no decodable frames", "check that the file plays")
        probe = _VideoProbe(n_decoded, probe.fps)  # the stream's rate stays the best estimate
        n_frames = video_frame_count(n_decoded, probe.fps, max_frames=max_frames)
        frames, _ = _decode_frames(path, video_frame_indices(n_decoded, n_frames))
    max_pixels = video_frame_max_pixels(n_frames, total_pixels, min_pixels)
    return _resize_frames(frames, max_pixels, min_pixels, path), n_frames / probe.n_frames * probe.fps


def _open_container(path: Path) -> Any:
    import av

    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"`{path}` is not a video file FFmpeg can read", "use an mp4, mov, webm or mkv video"
        ) from exc


def _probe_video(path: Path) -> _VideoProbe:
    """Frame count (video packets, no decoding) and frame rate of the first video stream."""
    import av

    with _open_container(path) as container:
        if not container.streams.video:
            raise InputError(f"`{path}` has no video stream", f"pass audio with {setting('speech')}")
        if _is_still_image_format(container.format.name):
            raise InputError(f"`{path}` is a still image, not a video", f"pass it with {setting('image')}")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # a codec tag FFmpeg does not know
            raise InputError(f"video `{path}` uses a codec FFmpeg cannot decode", "re-encode it as h264 mp4")
        _check_frame_size(stream.codec_context.width, stream.codec_context.height, path)
        try:
            n_packets = sum(1 for packet in container.demux(stream) if packet.size)
        except (av.FFmpegError, ValueError, OSError, MemoryError) as exc:
            raise InputError(f"cannot read video `{path}`: {exc}", "check that the file plays") from exc
        if n_packets == 0:
            raise InputError(f"video `{path}` has no frames", "check that the file plays")
        return _VideoProbe(n_packets, _stream_fps(stream, container, n_packets))


def _check_frame_size(width: int, height: int, path: Path) -> None:
    """Refuse frame sizes no camera makes: from the header before decoding, and per decoded frame (the
    stream's own header, e.g. h264's, can disagree with the container's)."""
    if width * height > MAX_VIDEO_FRAME_PIXELS:
        raise InputError(
            f"video `{path}` has frames of `{width}×{height}` px, above 8K (`7680×4320`)",
            "downscale it (e.g. `ffmpeg -i IN -vf scale=1280:-2 OUT.mp4`); the model sees at most 768 tokens a frame",
        )


def _is_still_image_format(demuxer: str) -> bool:
    """FFmpeg reads a jpg/png as a one-frame video; its image demuxers are `image2` and `*_pipe`."""
    return demuxer == "image2" or demuxer.endswith("_pipe")


def _stream_fps(stream: Any, container: Any, n_frames: int) -> float:
    """Average frame rate, else frames / duration, else the sampling rate (every frame a sample)."""
    # A damaged header can state a zero or negative rate or duration: those count as unstated.
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if container.duration is not None and container.duration > 0:
        return n_frames / (container.duration / 1_000_000)  # container.duration is in µs
    return VIDEO_SAMPLE_FPS


def _decode_frames(path: Path, indices: Sequence[int]) -> tuple[list[np.ndarray], int]:
    """RGB frames (H, W, 3) uint8 at `indices` (repeats allowed), and the number of frames decoded."""
    import av

    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    n_decoded = 0
    with _open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for n_decoded, frame in enumerate(container.decode(stream), start=1):
                if n_decoded - 1 in wanted:
                    _check_frame_size(frame.width, frame.height, path)  # before a whole RGB copy is made
                    kept[n_decoded - 1] = frame.to_ndarray(format="rgb24")
        except (av.FFmpegError, ValueError, OSError, MemoryError) as exc:  # damaged data, absurd sizes
            raise InputError(f"cannot decode video `{path}`: {exc}", "check that the file plays") from exc
    return [kept[i] for i in indices if i in kept], n_decoded


def _resize_frames(frames: list[np.ndarray], max_pixels: float, min_pixels: float, path: Path) -> np.ndarray:
    """All frames to one smart_resize'd size; PIL BICUBIC is antialiased like torchvision's resize."""
    height, width = frames[0].shape[:2]
    try:
        new_h, new_w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:  # aspect ratio beyond 200:1
        raise InputError(
            f"video `{path}` has an unusable frame shape: {exc}", "use a video of usual proportions"
        ) from exc
    resized = [Image.fromarray(f).resize((new_w, new_h), resample=Image.Resampling.BICUBIC) for f in frames]
    return np.stack([np.asarray(image) for image in resized])  # (T, H, W, 3) uint8


# ---------------------------------------------------------------------------------------------------
# Processor: pixels → ViT patches


_PREPROCESSOR_KEYS = frozenset(
    {"min_pixels", "max_pixels", "size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"}
)


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """The ViT folder's `preprocessor_config.json` (Qwen2-VL's released values by default)."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = PATCH_SIZE
    merge_size: int = MERGE_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionPreprocessConfig:
        """Older configs give `min_pixels`/`max_pixels`, newer ones `size.shortest_edge`/`longest_edge`."""
        size = raw.get("size") or {}
        min_pixels = raw.get("min_pixels") or size.get("min_pixels") or size.get("shortest_edge")
        max_pixels = raw.get("max_pixels") or size.get("max_pixels") or size.get("longest_edge")
        return cls(
            min_pixels=int(min_pixels or MIN_PIXELS),
            max_pixels=int(max_pixels or MAX_PIXELS),
            patch_size=int(raw.get("patch_size", PATCH_SIZE)),
            merge_size=int(raw.get("merge_size", MERGE_SIZE)),
            temporal_patch_size=int(raw.get("temporal_patch_size", TEMPORAL_PATCH_SIZE)),
            image_mean=tuple(float(x) for x in raw.get("image_mean", IMAGE_MEAN)),
            image_std=tuple(float(x) for x in raw.get("image_std", IMAGE_STD)),
            extra={k: v for k, v in raw.items() if k not in _PREPROCESSOR_KEYS},
        )

    @classmethod
    def from_dir(cls, vit_dir: Path) -> VisionPreprocessConfig:
        path = Path(vit_dir) / PREPROCESSOR_CONFIG
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            raise CheckpointError(f"`{path}` is missing", "copy the vision tower's preprocessor config") from exc
        except (ValueError, TypeError, AttributeError) as exc:  # bad JSON or bad value types
            raise CheckpointError(
                f"`{path}` is not a valid preprocessor config: {exc}", "restore it from the release"
            ) from exc


@dataclass
class VisualInput:
    """What the ViT consumes for one or more images (or one video).

    pixel_values: (n_patches, C·T·P·P) float32, patches in merge order per item
    grid_thw:     (n_items, 3) int64, (t, h, w) in patches; an image has t = 1
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    kind: VisualKind

    @property
    def token_counts(self) -> list[int]:
        """LLM tokens per item after the 2×2 merge."""
        return [n_tokens(row) for row in self.grid_thw]


def n_tokens(grid_thw_row: Sequence[int] | torch.Tensor, merge_size: int = MERGE_SIZE) -> int:
    """LLM tokens of one visual item: t·h·w patches folded 2×2 by the merger."""
    t, h, w = (int(x) for x in grid_thw_row)
    return t * h * w // merge_size**2


class VisualProcessor:
    """transformers' pillow-based Qwen2-VL image processor, plus video patches built from it.

    transformers' Qwen2-VL video processor needs torchvision (not importable here), so a video is
    processed frame by frame with the image processor (same resize, rescale and normalisation) and
    consecutive frame pairs are interleaved into temporal patches, the layout of Qwen2-VL's video
    patches: (t, h/2, w/2, 2, 2, C, T, P, P).
    """

    def __init__(self, config: VisionPreprocessConfig | None = None) -> None:
        from transformers import Qwen2VLImageProcessorPil

        self.config = config or VisionPreprocessConfig()
        self._processor = Qwen2VLImageProcessorPil(
            min_pixels=self.config.min_pixels,
            max_pixels=self.config.max_pixels,
            patch_size=self.config.patch_size,
            merge_size=self.config.merge_size,
            temporal_patch_size=self.config.temporal_patch_size,
            image_mean=list(self.config.image_mean),
            image_std=list(self.config.image_std),
        )

    @classmethod
    def from_dir(cls, vit_dir: Path) -> VisualProcessor:
        """Configured from `vit_dir/preprocessor_config.json` (a model's settings: towers.resolve_vision)."""
        return cls(VisionPreprocessConfig.from_dir(vit_dir))

    def images(self, images: Sequence[Image.Image]) -> VisualInput:
        """Patches of several images; each image fills both temporal slots (grid t = 1)."""
        if not images:
            raise ValueError("VisualProcessor.images needs at least one image")
        out = self._processor.preprocess(list(images), return_tensors="pt")
        return VisualInput(out["pixel_values"], out["image_grid_thw"].long(), "image")

    def video(self, frames: np.ndarray) -> VisualInput:
        """Patches of one video (T, H, W, 3) uint8; an odd last frame is repeated, grid t = T/2."""
        if frames.ndim != 4 or frames.shape[-1] != CHANNELS or len(frames) == 0:
            raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
        temporal = self.config.temporal_patch_size
        if pad := -len(frames) % temporal:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        per_frame = self._processor.preprocess(
            [Image.fromarray(f) for f in frames], temporal_patch_size=1, return_tensors="np"
        )
        _, grid_h, grid_w = (int(x) for x in per_frame["image_grid_thw"][0])
        grid_t = len(frames) // temporal
        patch = self.config.patch_size
        # (T·h·w, C·P·P) → (t, T, h·w, C, P, P) → (t, h·w, C, T, P, P): pairs become temporal patches
        pixels = per_frame["pixel_values"].reshape(grid_t, temporal, grid_h * grid_w, CHANNELS, patch, patch)
        pixels = pixels.transpose(0, 2, 3, 1, 4, 5).reshape(grid_t * grid_h * grid_w, -1)
        grid = torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)
        return VisualInput(torch.from_numpy(np.ascontiguousarray(pixels)), grid, "video")


# ---------------------------------------------------------------------------------------------------
# Tower and positions


def encode_visual(tower: nn.Module, visual: VisualInput) -> torch.Tensor:
    """Merged visual tokens (n_tokens, H) from transformers' `Qwen2VisionTransformerPretrainedModel`.

    Runs in the tower's compute dtype and device (the first floating parameter, so a quantized tower's
    integer weights are not mistaken for it). transformers 5 returns the merger output as
    `pooler_output`; 4.x returned the tensor itself.
    """
    weight = next(p for p in tower.parameters() if p.is_floating_point())
    pixel_values = visual.pixel_values.to(device=weight.device, dtype=weight.dtype)
    with torch.inference_mode():
        out = tower(pixel_values, grid_thw=visual.grid_thw.to(weight.device))
    merged = out if isinstance(out, torch.Tensor) else out.pooler_output
    expected = sum(visual.token_counts)
    if merged.shape[0] != expected:
        raise ValueError(f"vision tower returned {merged.shape[0]} tokens, expected {expected} from grid_thw")
    return merged


def image_positions(grid_thw_row: Sequence[int] | torch.Tensor, start: int) -> torch.Tensor:
    """(3, n_tokens) int64 M-RoPE (t, h, w) positions of one visual item, offset by `start`
    (docs/authors-behaviour.md#m-rope-positions).

    After the 2×2 merge the grid is (t, h/2, w/2); tokens run t-major, then rows, then columns.
    Video frames get consecutive t indices (no temporal scaling, as the official code).
    """
    t, h, w = (int(x) for x in grid_thw_row)
    h, w = h // MERGE_SIZE, w // MERGE_SIZE
    t_index = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    h_index = torch.arange(h).view(1, h, 1).expand(t, h, w)
    w_index = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([t_index, h_index, w_index]).reshape(3, -1) + start
