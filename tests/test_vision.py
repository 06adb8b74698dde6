"""Image/video loading, Qwen2-VL patches, the ViT call and M-RoPE positions
(docs/authors-behaviour.md#image-and-video-rules)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lyra_cli.engine.model import vision
from lyra_cli.engine.model.vision import (
    CLI_MAX_SIDE,
    EVAL_MAX_SIDE,
    IMAGE_FACTOR,
    IMAGE_MEAN,
    IMAGE_STD,
    MAX_PIXELS,
    MIN_PIXELS,
    TRAIN_VIDEO_TOTAL_PIXELS,
    VIDEO_FRAME_MAX_PIXELS,
    VIDEO_MAX_FRAMES,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    VisionPreprocessConfig,
    VisualProcessor,
    encode_visual,
    image_positions,
    load_image,
    load_video_frames,
    lyra_image_size,
    n_tokens,
    smart_resize,
    video_frame_count,
    video_frame_indices,
    video_frame_max_pixels,
)
from lyra_cli.errors import CheckpointError, InputError

REAL = Path(__file__).parents[2] / "shared" / "data" / "real"
IRONING = REAL / "extreme_ironing.jpg"  # 570×380
MOVEMENT = REAL / "movement.mp4"  # 103 frames, 24 fps, 360×480


@pytest.fixture(scope="module")
def processor() -> VisualProcessor:
    return VisualProcessor()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG with a valid IHDR and no pixel data: opening it reads the size, decoding it must fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _write_video(path: Path, codec: str, n_frames: int, size: tuple[int, int] = (64, 48)) -> None:
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --- images: formats, orientation, colour modes ----------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".bmp", ".gif", ".tiff"])
def test_loads_every_common_format(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ironing{suffix}"
    Image.open(IRONING).save(path)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (570, 380))


def test_lossless_copy_has_identical_pixels(tmp_path: Path) -> None:
    Image.open(IRONING).save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "x.png")), np.asarray(load_image(IRONING)))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :10] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise for display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (40, 60)  # width and height swapped
    red, green = np.asarray(image)[5, 34, :2]  # the block is now at the top-right
    assert red > 200 and green < 60


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((30, 30, 4), np.uint8)  # fully transparent black
    rgba[:, 15:] = (0, 0, 255, 255)  # opaque blue on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = np.asarray(load_image(tmp_path / "rgba.png"))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 29]) == (0, 0, 255)

    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (15, 0, 30, 30))
    palette.save(tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    pixels = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 29]) == (255, 0, 0)


def test_other_modes_become_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (30, 30), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (30, 30), 128).save(tmp_path / "gray.png")
    Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(tmp_path / "deep.png")  # mode I;16
    assert np.asarray(load_image(tmp_path / "cmyk.jpg")).min() > 245  # no ink = white
    assert tuple(np.asarray(load_image(tmp_path / "gray.png"))[0, 0]) == (128, 128, 128)
    assert tuple(np.asarray(load_image(tmp_path / "deep.png"))[0, 0]) == (255, 255, 255)  # not clipped noise


# --- images: Lyra's resize rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((570, 380), CLI_MAX_SIDE, (570, 380)),  # untouched
        ((3000, 100), CLI_MAX_SIDE, (2880, 96)),  # max side capped, int() truncation
        ((3000, 2000), EVAL_MAX_SIDE, (1920, 1280)),
        ((10, 40), CLI_MAX_SIDE, (28, 40)),  # each short side lifted to 28 on its own
        ((10000, 20), CLI_MAX_SIDE, (2880, 28)),  # ratio ≤ 2880/28 ≈ 103: the clamp cannot fire
        ((10000, 20), 20000, (5040, 28)),  # 10000:28 > 200:1 → 180:1
        ((20, 10000), 20000, (28, 5040)),
    ],
)
def test_lyra_image_size(size: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    assert lyra_image_size(*size, max_side=max_side) == expected


def test_load_image_applies_the_resize_rules(tmp_path: Path) -> None:
    Image.new("RGB", (3000, 100), "white").save(tmp_path / "wide.png")
    Image.new("RGB", (10, 40), "white").save(tmp_path / "small.png")
    Image.new("RGB", (10000, 20), "white").save(tmp_path / "strip.png")
    assert load_image(tmp_path / "wide.png").size == (2880, 96)
    assert load_image(tmp_path / "small.png").size == (28, 40)
    assert load_image(tmp_path / "strip.png", max_side=20000).size == (5040, 28)


# --- images: refused inputs ------------------------------------------------------------------------


def test_tiny_image_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(InputError, match="too small"):
        load_image(tmp_path / "dot.png")


def test_huge_image_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    _png_header_only(path, 20000, 20000)  # 400 MP; there are no pixels to decode at all
    with pytest.raises(InputError, match="too large") as info:
        load_image(path)
    assert "downscale" in info.value.hint


def test_our_pixel_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 100 * 100)
    path = tmp_path / "big.png"
    _png_header_only(path, 150, 150)  # decoding would report truncation, not size
    with pytest.raises(InputError, match="too large"):
        load_image(path)


def test_truncated_image_is_refused(tmp_path: Path) -> None:
    data = IRONING.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")


def test_bad_paths_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path)


# --- processor -------------------------------------------------------------------------------------


def test_smart_resize_hand_checked() -> None:
    assert smart_resize(380, 570, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (392, 560)
    assert smart_resize(10, 10, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (56, 56)
    h, w = smart_resize(4000, 3000, min_pixels=MIN_PIXELS, max_pixels=1_000_000)
    assert h % IMAGE_FACTOR == 0 and w % IMAGE_FACTOR == 0 and h * w <= 1_000_000
    with pytest.raises(ValueError):
        smart_resize(28, 28 * 201, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def test_image_patches_of_the_real_photo(processor: VisualProcessor) -> None:
    visual = processor.images([load_image(IRONING)])
    # 380×570 → smart_resize (392, 560) → 28×40 patches of 14 px → 280 tokens after the 2×2 merge
    assert visual.kind == "image"
    assert visual.grid_thw.tolist() == [[1, 28, 40]]
    assert visual.pixel_values.shape == (28 * 40, 3 * 2 * 14 * 14)
    assert visual.token_counts == [280] and n_tokens([1, 28, 40]) == 280


def test_image_patch_values_are_clip_normalised(processor: VisualProcessor) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)  # ≥ min pixels: no resize
    visual = processor.images([Image.fromarray(pixels)])
    first = visual.pixel_values[0].reshape(3, 2, 14, 14)  # (C, T, P, P); both T slots are the image
    expected = (pixels[:14, :14] / 255.0 - IMAGE_MEAN) / IMAGE_STD  # (P, P, C)
    assert torch.equal(first[:, 0], first[:, 1])
    assert np.allclose(first[:, 0].numpy(), expected.transpose(2, 0, 1), atol=1e-5)


def test_preprocessor_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 28 * 28 * 64, "image_processor_type": "Qwen2VLImageProcessor"})
    )
    config = VisionPreprocessConfig.from_dir(tmp_path)
    assert (config.max_pixels, config.extra) == (28 * 28 * 64, {"image_processor_type": "Qwen2VLImageProcessor"})
    visual = VisualProcessor(config).images([load_image(IRONING)])
    assert visual.token_counts[0] <= 64
    size_style = VisionPreprocessConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 2000}})
    assert (size_style.min_pixels, size_style.max_pixels) == (100, 2000)
    with pytest.raises(CheckpointError):
        VisionPreprocessConfig.from_dir(tmp_path / "nowhere")


# --- video -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total_frames", "fps", "expected"),
    [
        (103, 24.0, 8),  # 4.3 s · 2 fps = 8.6 → 8
        (3000, 25.0, VIDEO_MAX_FRAMES),  # 2 minutes: capped
        (10, 30.0, 4),  # 0.7 frames wanted: the 4-frame minimum
        (41, 10.0, 8),  # 8.2 → 8
        (45, 10.0, 8),  # 9.0 → 9/2 = 4.5 rounds half to even → 4 pairs, as qwen-vl-utils' round_by_factor
        (5, 1.0, 4),  # 10 wanted > 5 frames: officially an error, here every (even) frame
        (1, 25.0, 4),  # one frame, repeated
    ],
)
def test_video_frame_count(total_frames: int, fps: float, expected: int) -> None:
    assert video_frame_count(total_frames, fps) == expected


def test_video_frame_indices_and_budget() -> None:
    assert video_frame_indices(103, 8) == [0, 15, 29, 44, 58, 73, 87, 102]
    assert video_frame_indices(1, 4) == [0, 0, 0, 0]
    assert video_frame_max_pixels(8, VIDEO_TOTAL_PIXELS, VIDEO_MIN_PIXELS) == VIDEO_FRAME_MAX_PIXELS
    assert video_frame_max_pixels(16, TRAIN_VIDEO_TOTAL_PIXELS, VIDEO_MIN_PIXELS) == VIDEO_FRAME_MAX_PIXELS
    assert video_frame_max_pixels(16, 100_000, VIDEO_MIN_PIXELS) == 12_500  # budget / 8 temporal patches
    assert video_frame_max_pixels(16, 1_000, VIDEO_MIN_PIXELS) == int(VIDEO_MIN_PIXELS * 1.05)


def test_real_video_frames(processor: VisualProcessor) -> None:
    frames, sample_fps = load_video_frames(MOVEMENT)
    # 8 frames of 480×360 → smart_resize (476, 364), within 768 tokens' worth per frame
    assert frames.shape == (8, 476, 364, 3) and frames.dtype == np.uint8
    assert sample_fps == pytest.approx(8 / 103 * 24)
    visual = processor.video(frames)
    assert visual.kind == "video"
    assert visual.grid_thw.tolist() == [[4, 34, 26]]  # grid_t = frames / 2
    assert visual.pixel_values.shape == (4 * 34 * 26, 3 * 2 * 14 * 14)
    assert visual.token_counts == [884]


def test_video_patches_equal_image_patches_for_repeated_frames(processor: VisualProcessor) -> None:
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 256, (2, 56, 84, 3), dtype=np.uint8)
    video = processor.video(np.stack([first, first, second, second]))
    images = processor.images([Image.fromarray(first), Image.fromarray(second)])
    assert video.grid_thw.tolist() == [[2, 4, 6]] and images.grid_thw.tolist() == [[1, 4, 6], [1, 4, 6]]
    assert torch.allclose(video.pixel_values, images.pixel_values)


def test_video_patch_layout_matches_qwen2_vl(processor: VisualProcessor) -> None:
    frames = np.random.default_rng(2).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    video = processor.video(frames)
    # Qwen2-VL's video layout: (t, T, C, h/2, 2, P, w/2, 2, P) → (t, h/2, w/2, 2, 2, C, T, P, P)
    normed = ((frames / 255.0 - IMAGE_MEAN) / IMAGE_STD).transpose(0, 3, 1, 2)  # (4, C, 56, 84)
    grid_t, grid_h, grid_w = 2, 4, 6
    patches = normed.reshape(grid_t, 2, 3, grid_h // 2, 2, 14, grid_w // 2, 2, 14)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(grid_t * grid_h * grid_w, -1)
    assert video.grid_thw.tolist() == [[grid_t, grid_h, grid_w]]
    assert np.allclose(video.pixel_values.numpy(), patches, atol=1e-5)


def test_odd_frame_count_repeats_the_last_frame(processor: VisualProcessor) -> None:
    frames = np.random.default_rng(3).integers(0, 256, (3, 28, 56, 3), dtype=np.uint8)
    padded = np.concatenate([frames, frames[-1:]])
    assert torch.equal(processor.video(frames).pixel_values, processor.video(padded).pixel_values)


@pytest.mark.parametrize(("suffix", "codec"), [(".webm", "libvpx"), (".mkv", "mpeg4")])
def test_short_clip_in_other_containers(tmp_path: Path, suffix: str, codec: str) -> None:
    path = tmp_path / f"clip{suffix}"
    _write_video(path, codec, n_frames=3)
    frames, _ = load_video_frames(path)
    assert frames.shape == (4, 56, 56, 3)  # 3 frames → 4 (the minimum), 48×64 → 56×56 (min pixels)


def test_bad_videos_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.mp4").write_text("not a video\n")
    with pytest.raises(InputError, match="not a video file"):
        load_video_frames(tmp_path / "notes.mp4")
    with pytest.raises(InputError, match="does not exist"):
        load_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="no video stream"):
        load_video_frames(REAL / "Hi.mp3")
    with pytest.raises(InputError, match="still image"):
        load_video_frames(IRONING)


def test_video_stream_without_frames_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty_video.mkv"
    with av.open(str(path), "w") as container:  # a video stream, but only audio packets
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*audio.encode(frame), *audio.encode()]:
            container.mux(packet)
    with pytest.raises(InputError, match="no frames"):
        load_video_frames(path)


# --- tower and positions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tower() -> torch.nn.Module:
    from transformers import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(
        depth=2, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
    )
    return Qwen2VisionTransformerPretrainedModel(config).eval()


def test_encode_visual_returns_merged_tokens(tiny_tower: torch.nn.Module, processor: VisualProcessor) -> None:
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in [(56, 84, 3), (112, 56, 3)]]
    visual = processor.images(images)
    tokens = encode_visual(tiny_tower, visual)
    assert visual.token_counts == [6, 8]  # (1·4·6)/4 and (1·8·4)/4
    assert tokens.shape == (14, 64)
    with torch.no_grad():
        reference = tiny_tower(visual.pixel_values, grid_thw=visual.grid_thw).pooler_output
    assert torch.equal(tokens, reference)


def test_encode_visual_video_in_tower_dtype(tiny_tower: torch.nn.Module, processor: VisualProcessor) -> None:
    frames = np.random.default_rng(5).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    visual = processor.video(frames)
    tokens = encode_visual(tiny_tower, visual)
    t, h, w = visual.grid_thw[0].tolist()
    assert tokens.shape == (t * h * w // 4, 64) == (8, 64)
    half = encode_visual(tiny_tower.to(torch.bfloat16), visual)
    tiny_tower.to(torch.float32)
    assert half.dtype == torch.bfloat16 and half.shape == tokens.shape


def test_image_positions_hand_checked() -> None:
    positions = image_positions([1, 4, 6], start=10)  # merged grid 1 × 2 × 3
    assert positions.dtype == torch.long
    assert positions.tolist() == [
        [10, 10, 10, 10, 10, 10],
        [10, 10, 10, 11, 11, 11],
        [10, 11, 12, 10, 11, 12],
    ]


def test_video_positions_step_time_by_one() -> None:
    positions = image_positions(torch.tensor([2, 2, 4]), start=0)  # merged grid 2 × 1 × 2
    assert positions.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
    assert positions.shape[1] == n_tokens([2, 2, 4])
