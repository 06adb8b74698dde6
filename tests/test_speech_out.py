"""The CTC speech generator (docs/authors-behaviour.md#speech-generator).

Contracts: greedy CTC collapse (repeats first, then blanks) is the same chunk by chunk as on the whole
sequence; the layers equal a transformers `Qwen2DecoderLayer` stack with plain 1-D RoPE and a causal mask;
later states never change earlier frames; the streamed units equal the offline units for any push pattern,
with each push computing only its own 25·k frames; the loader accounts for every `speech_generator.*` key.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from lyra_cli.engine.model.checkpoint import GENERATOR_PREFIX, SPEECH_GENERATOR_FILE
from lyra_cli.engine.model.config import SpeechGeneratorConfig, parse_config
from lyra_cli.engine.model.speech_generator import (
    TINY_NONBLANK_FRACTION,
    SpeechGenerator,
    UnitStream,
    ctc_collapse,
    load_speech_generator,
    tiny_generator_config,
    write_tiny_speech_generator,
)
from lyra_cli.errors import CheckpointError

LLM_HIDDEN = 48
ROPE_THETA = 1e6
# A small unit vocabulary, so the same unit often spans a push boundary (the case `previous` exists for).
CONFIG = SpeechGeneratorConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, unit_vocab_size=6)
FRAMES = CONFIG.upsample_factor
BLANK = CONFIG.unit_vocab_size
N_STATES = 12
# Parity checks run in float64: the large random q/k weights saturate attention, which amplifies fp32
# summation-order noise to ~1e-4, while any real mismatch (a wrong position, a missing key) is far larger.
EXACT_ATOL = 1e-9
TINY_HIDDEN = 64  # tiny.HIDDEN


def random_generator(seed: int, config: SpeechGeneratorConfig = CONFIG) -> SpeechGenerator:
    """Every parameter random (biases and norm weights too); large q/k so frames inside a state differ."""
    gen = torch.Generator().manual_seed(seed)
    model = SpeechGenerator(config, LLM_HIDDEN, ROPE_THETA).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                scale = 1.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.2
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def random_states(n: int, seed: int, width: int = LLM_HIDDEN) -> Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))  # (n, H)


@pytest.fixture(scope="module")
def generator() -> SpeechGenerator:
    return random_generator(seed=0)


@pytest.fixture(scope="module")
def states() -> Tensor:
    return random_states(N_STATES, seed=1)


@pytest.fixture(scope="module")
def generator64(generator: SpeechGenerator) -> SpeechGenerator:
    return copy.deepcopy(generator).double()


# ---------------------------------------------------------------------------------- CTC collapse

B = 9


@pytest.mark.parametrize(
    ("frames", "previous", "units"),
    [
        ([], None, []),
        ([B, B, B], None, []),
        ([3, 3, 3], None, [3]),
        ([3, B, 3], None, [3, 3]),  # a blank separates two real repeats: dedup first, then drop blanks
        ([3, 3, B, B, 4, 4, 3, B], None, [3, 4, 3]),
        ([0, 0, 1], None, [0, 1]),  # unit 0 is a unit, not "nothing before"
        ([3, 3, 4], 3, [4]),  # the 3 continues from the previous chunk
        ([B, 3], 3, [3]),  # ... but resumes after a blank
        ([3], B, [3]),
        ([B, B], 3, []),
    ],
)
def test_ctc_collapse_by_hand(frames: list[int], previous: int | None, units: list[int]) -> None:
    assert ctc_collapse(frames, B, previous=previous) == units
    assert ctc_collapse(torch.tensor(frames, dtype=torch.long), B, previous=previous) == units


def test_ctc_collapse_chunkwise_equals_whole() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        frames = torch.randint(0, 4, (30,), generator=gen).tolist()  # alphabet {0, 1, 2, blank=3}
        whole = ctc_collapse(frames, blank=3)
        cuts = sorted(torch.randint(0, 31, (4,), generator=gen).tolist())
        pieces, previous = [], None
        for start, stop in zip([0, *cuts], [*cuts, 30]):
            pieces += ctc_collapse(frames[start:stop], blank=3, previous=previous)
            previous = frames[stop - 1] if stop > start else previous
        assert pieces == whole


# ---------------------------------------------------------------------------------- architecture


def test_state_dict_keys_follow_the_release_layout() -> None:
    keys = set(SpeechGenerator(CONFIG, LLM_HIDDEN, ROPE_THETA).state_dict())
    per_layer = [
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
    ]  # fmt: skip
    expected = {"input_proj.weight", "input_proj.bias", "output_proj.weight", "output_proj.bias"}
    expected |= {f"layers.{i}.{name}" for i in range(CONFIG.num_layers) for name in per_layer}
    assert keys == expected  # no final norm, as in LLaMA-Omni's SpeechGeneratorCTC


def test_rotary_is_plain_1d_rope(generator: SpeechGenerator) -> None:
    head_dim = CONFIG.hidden_size // CONFIG.num_heads
    positions = torch.arange(0, 3000, 7)
    cos, sin = generator.rotary(positions.expand(3, 1, -1), torch.float32)  # (1, T, hs)
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[:, None].double() * inv_freq  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0].double(), angles.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[0].double(), angles.sin(), atol=1e-5, rtol=0)


def reference_logits(ours: SpeechGenerator, hidden: Tensor) -> Tensor:
    """The official computation, with transformers' Qwen2 layers and rotary table, and an explicit causal mask."""
    hf = Qwen2Config(
        hidden_size=CONFIG.hidden_size,
        intermediate_size=CONFIG.intermediate_size,
        num_hidden_layers=CONFIG.num_layers,
        num_attention_heads=CONFIG.num_heads,
        num_key_value_heads=CONFIG.num_heads,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )
    hf._attn_implementation = "sdpa"  # eager would take its softmax in fp32, sdpa stays in float64
    layers = torch.nn.ModuleList(Qwen2DecoderLayer(hf, i) for i in range(CONFIG.num_layers)).eval()
    layers.to(ours.input_proj.weight.dtype)
    layers.load_state_dict(ours.layers.state_dict(), strict=True)
    x = ours.input_proj(hidden).repeat_interleave(FRAMES, dim=0)[None]  # (1, T, D)
    n_frames = x.shape[1]
    position_ids = torch.arange(n_frames)[None]
    rope = Qwen2RotaryEmbedding(hf)(x, position_ids)
    # The mask in the compute dtype: torch 2.13 CPU SDPA silently mis-adds a float32 mask to float64 scores.
    mask = torch.full((1, 1, n_frames, n_frames), float("-inf"), dtype=x.dtype).triu(1)
    for layer in layers:
        x = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
    return ours.output_proj(x)[0]


def test_offline_logits_match_transformers_qwen2_layers(generator64: SpeechGenerator, states: Tensor) -> None:
    with torch.no_grad():
        ours = generator64.forward_offline(states.double())
        theirs = reference_logits(generator64, states.double())
    assert ours.shape == (N_STATES * FRAMES, CONFIG.unit_vocab_size + 1)
    torch.testing.assert_close(ours, theirs, atol=EXACT_ATOL, rtol=0)


def test_later_states_do_not_change_earlier_frames(generator: SpeechGenerator, states: Tensor) -> None:
    changed_state = 7
    other = states.clone()
    other[changed_state] = random_states(1, seed=99)[0]
    with torch.no_grad():
        before, after = generator.forward_offline(states), generator.forward_offline(other)
    boundary = changed_state * FRAMES
    torch.testing.assert_close(before[:boundary], after[:boundary], atol=1e-6, rtol=0)
    assert (before[boundary:] - after[boundary:]).abs().amax(-1).min() > 1e-4  # every later frame sees it


def test_frames_of_one_state_are_not_all_alike(generator: SpeechGenerator, states: Tensor) -> None:
    """The upsampled frames differ by position (RoPE), so the stream tests cover in-state label changes."""
    labels = generator.forward_offline(states).argmax(-1).view(N_STATES, FRAMES)
    assert any(len(set(row.tolist())) > 1 for row in labels[1:])


# ---------------------------------------------------------------------------------- streaming


PUSH_PATTERNS = {
    "one_by_one": [1] * N_STATES,
    "chunks_of_3": [3] * (N_STATES // 3),
    "all_at_once": [N_STATES],
    "irregular": [2, 1, 4, 1, 1, 3],
}


def test_push_boundaries_are_exercised(generator: SpeechGenerator, states: Tensor) -> None:
    """The offline labels continue one unit across a state boundary, so ignoring `previous` would fail."""
    labels = generator.forward_offline(states).argmax(-1)
    boundaries = torch.arange(FRAMES, N_STATES * FRAMES, FRAMES)
    spans = (labels[boundaries - 1] == labels[boundaries]) & (labels[boundaries] != BLANK)
    assert spans.any()
    assert (labels == BLANK).any() and (labels != BLANK).any()


@pytest.mark.parametrize("pattern", sorted(PUSH_PATTERNS))
def test_stream_equals_offline(generator: SpeechGenerator, states: Tensor, pattern: str) -> None:
    sizes = PUSH_PATTERNS[pattern]
    assert sum(sizes) == N_STATES
    stream, streamed, start = UnitStream(generator), [], 0
    for size in sizes:
        chunk = states[start] if size == 1 else states[start : start + size]  # (H,) or (k, H)
        streamed += stream.push(chunk)
        start += size
    assert streamed == generator.predict_units(states)
    assert stream.n_frames == N_STATES * FRAMES


def test_cached_logits_equal_offline_logits(generator64: SpeechGenerator, states: Tensor) -> None:
    stream, pieces, start = UnitStream(generator64), [], 0
    with torch.no_grad():
        for size in PUSH_PATTERNS["irregular"]:
            chunk = states[start : start + size].double()
            pieces.append(generator64.forward_frames(chunk, stream.n_frames, stream.cache))
            stream.n_frames += size * FRAMES
            start += size
        offline = generator64.forward_offline(states.double())
    torch.testing.assert_close(torch.cat(pieces), offline, atol=EXACT_ATOL, rtol=0)


def test_each_push_computes_only_its_own_frames(generator: SpeechGenerator, states: Tensor) -> None:
    rows: dict[str, list[int]] = {"input_proj": [], "layer": [], "keys": []}
    hooks = [
        generator.input_proj.register_forward_pre_hook(lambda _m, args: rows["input_proj"].append(args[0].shape[0])),
        generator.layers[0].register_forward_pre_hook(lambda _m, args: rows["layer"].append(args[0].shape[1])),
        generator.layers[-1].self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args: rows["keys"].append(args[0].shape[1])
        ),
    ]
    try:
        stream = UnitStream(generator)
        for i in range(N_STATES):
            stream.push(states[i])
            assert stream.cache.layer_length(CONFIG.num_layers - 1) == (i + 1) * FRAMES  # attends to all frames
    finally:
        for hook in hooks:
            hook.remove()
    assert rows["input_proj"] == [1] * N_STATES
    assert rows["layer"] == [FRAMES] * N_STATES  # new query rows only: no recomputation of the prefix
    assert rows["keys"] == [FRAMES] * N_STATES


def test_empty_push_emits_nothing(generator: SpeechGenerator) -> None:
    stream = UnitStream(generator)
    assert stream.push(torch.empty(0, LLM_HIDDEN)) == []
    assert stream.n_frames == 0


# ---------------------------------------------------------------------------------- loading


def write_model_dir(folder: Path, *, with_generator: bool = True) -> Path:
    """A config.json (tiny LLM sizes) and, optionally, the tiny `speech_generator.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "model_type": "Lyra_Qwen2VL", "vocab_size": 128, "hidden_size": TINY_HIDDEN, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": ROPE_THETA,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    }  # fmt: skip
    if with_generator:
        raw |= tiny_generator_config()
        write_tiny_speech_generator(folder, TINY_HIDDEN, ROPE_THETA, seed=0)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def load(folder: Path) -> SpeechGenerator | None:
    config = parse_config(json.loads((folder / "config.json").read_text()))
    return load_speech_generator(folder, config, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny-generator"))


def test_tiny_generator_round_trip(tiny_folder: Path) -> None:
    stored = load_file(str(tiny_folder / SPEECH_GENERATOR_FILE))
    assert all(k.startswith(GENERATOR_PREFIX) and v.dtype == torch.bfloat16 for k, v in stored.items())
    model = load(tiny_folder)
    assert model is not None and not model.training
    state = model.state_dict()
    assert {GENERATOR_PREFIX + k for k in state} == set(stored)
    for key, value in state.items():
        assert torch.equal(value, stored[GENERATOR_PREFIX + key].float()), key
    assert model.config.unit_vocab_size == 1000 and model.blank == 1000


def test_tiny_generator_emits_a_mix_of_units_and_blanks(tiny_folder: Path) -> None:
    model = load(tiny_folder)
    assert model is not None
    labels = model.forward_offline(random_states(40, seed=5, width=TINY_HIDDEN)).argmax(-1)
    non_blank = (labels != model.blank).float().mean().item()
    units = model.predict_units(random_states(40, seed=5, width=TINY_HIDDEN))
    assert abs(non_blank - TINY_NONBLANK_FRACTION) < 0.2  # calibrated, on random states of the same scale
    assert len(units) >= 40 and len(set(units)) >= 20  # audibly varied downstream, not one repeated unit


def test_unprefixed_file_and_main_shard_keys_load(tiny_folder: Path, tmp_path: Path) -> None:
    stored = load_file(str(tiny_folder / SPEECH_GENERATOR_FILE))
    bare = write_model_dir(tmp_path / "bare")
    save_file({k.removeprefix(GENERATOR_PREFIX): v for k, v in stored.items()}, str(bare / SPEECH_GENERATOR_FILE))
    in_shards = write_model_dir(tmp_path / "shards")
    (in_shards / SPEECH_GENERATOR_FILE).unlink()
    save_file({**stored, "lm_head.weight": torch.zeros(2, 2)}, str(in_shards / "model.safetensors"))
    reference = load(tiny_folder).state_dict()  # type: ignore[union-attr]
    for folder in (bare, in_shards):
        state = load(folder).state_dict()  # type: ignore[union-attr]
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_missing_weight_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    folder = write_model_dir(tmp_path / "broken")
    dropped = GENERATOR_PREFIX + "layers.1.mlp.up_proj.weight"
    stored = load_file(str(tiny_folder / SPEECH_GENERATOR_FILE))
    save_file({k: v for k, v in stored.items() if k != dropped}, str(folder / SPEECH_GENERATOR_FILE))
    with pytest.raises(CheckpointError, match=f"`{dropped}`"):
        load(folder)


def test_unexpected_key_is_reported(tiny_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_model_dir(tmp_path / "extra")
    stored = load_file(str(tiny_folder / SPEECH_GENERATOR_FILE))
    extra = GENERATOR_PREFIX + "norm.weight"
    save_file({**stored, extra: torch.ones(64)}, str(folder / SPEECH_GENERATOR_FILE))
    with caplog.at_level(logging.WARNING):
        assert load(folder) is not None
    assert extra in caplog.text


def test_declared_but_missing_file_is_an_error(tmp_path: Path) -> None:
    folder = write_model_dir(tmp_path / "missing")
    (folder / SPEECH_GENERATOR_FILE).unlink()
    with pytest.raises(CheckpointError, match=SPEECH_GENERATOR_FILE) as excinfo:
        load(folder)
    assert excinfo.value.hint


def test_no_generator_in_config_loads_none(tmp_path: Path) -> None:
    folder = write_model_dir(tmp_path / "text-only", with_generator=False)
    assert load(folder) is None


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    folder = write_model_dir(tmp_path / "corrupt")
    (folder / SPEECH_GENERATOR_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load(folder)
