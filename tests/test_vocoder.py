"""Unit vocoder (docs/release-format.md#unit-vocoder): fairseq's checkpoint format, offline output,
stream == offline."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lyra_cli.engine.model.vocoder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    STREAM_TOLERANCE,
    TINY_VOCODER_CONFIG,
    UnitVocoder,
    VocoderStream,
    build_tiny_vocoder,
    generator_reach_frames,
    load_vocoder,
    parse_vocoder_config,
    save_fairseq_checkpoint,
    write_tiny_vocoder,
)
from lyra_cli.errors import CheckpointError, InputError

N_UNITS = 150
SHORT_UNITS = 30  # chunks of 1 unit on a short answer: the default run's representative of the smallest chunk
HOP = 320  # 20 ms at 16 kHz: one unit frame
# The released km1000_lj vocoder's config.json (docs/release-format.md#unit-vocoder), less its training-only keys.
RELEASE_CONFIG = {
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 1000,
    "embedding_dim": 128,
    "model_in_dim": 128,
    "segment_size": 8960,
    "code_hop_size": 320,
    "f0": False,
    "dur_predictor_params": {
        "encoder_embed_dim": 128,
        "var_pred_hidden_dim": 128,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16000,
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vocoder")
    write_tiny_vocoder(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def vocoder(tiny_folder: Path) -> UnitVocoder:
    return load_vocoder(tiny_folder, device="cpu")


@pytest.fixture(scope="module")
def units() -> list[int]:
    return np.random.default_rng(0).integers(0, 1000, N_UNITS).tolist()


def _fairseq_keys(n_levels: int, blocks_per_level: int) -> set[str]:
    """fairseq's CodeGenerator state-dict keys, written from its module names (hifigan.py, fastspeech2.py)."""

    def weight_normed(prefix: str) -> set[str]:
        return {f"{prefix}.weight_g", f"{prefix}.weight_v", f"{prefix}.bias"}

    keys = {"dict.weight"} | weight_normed("conv_pre") | weight_normed("conv_post")
    for i in range(n_levels):
        keys |= weight_normed(f"ups.{i}")
    for j in range(n_levels * blocks_per_level):
        for k in range(3):
            keys |= weight_normed(f"resblocks.{j}.convs1.{k}") | weight_normed(f"resblocks.{j}.convs2.{k}")
    for module in ("conv1.0", "ln1", "conv2.0", "ln2", "proj"):
        keys |= {f"dur_predictor.{module}.weight", f"dur_predictor.{module}.bias"}
    return keys


def _reference_wave(state: dict[str, torch.Tensor], units: list[int]) -> torch.Tensor:
    """fairseq's CodeGenerator.forward(dur_prediction=True), spelled out in functional ops on raw checkpoint
    tensors (codehifigan.py, hifigan.py, fastspeech2.py VariancePredictor), for the tiny config."""
    config = TINY_VOCODER_CONFIG

    def conv(x: torch.Tensor, name: str, dilation: int = 1) -> torch.Tensor:
        v, g = state[f"{name}.weight_v"], state[f"{name}.weight_g"]
        weight = g * v / v.norm(dim=(1, 2), keepdim=True)
        padding = dilation * (weight.shape[-1] - 1) // 2
        return F.conv1d(x, weight, state[f"{name}.bias"], padding=padding, dilation=dilation)

    def predictor_layer(h: torch.Tensor, i: int) -> torch.Tensor:  # (1, C, n) -> (1, C, n)
        conv_weights = (state[f"dur_predictor.conv{i}.0.weight"], state[f"dur_predictor.conv{i}.0.bias"])
        h = F.relu(F.conv1d(h, *conv_weights, padding=1))
        ln = (state[f"dur_predictor.ln{i}.weight"], state[f"dur_predictor.ln{i}.bias"])
        return F.layer_norm(h.transpose(1, 2), h.shape[1:2], *ln).transpose(1, 2)

    x = state["dict.weight"][torch.tensor(units)].T[None]  # (1, C, n)
    hidden = predictor_layer(predictor_layer(x, 1), 2)
    log_dur = F.linear(hidden.transpose(1, 2), state["dur_predictor.proj.weight"], state["dur_predictor.proj.bias"])
    x = torch.repeat_interleave(x, torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1).view(-1), dim=2)
    x = conv(x, "conv_pre")
    n_blocks = len(config["resblock_kernel_sizes"])
    for i, (rate, kernel) in enumerate(zip(config["upsample_rates"], config["upsample_kernel_sizes"])):
        v, g = state[f"ups.{i}.weight_v"], state[f"ups.{i}.weight_g"]
        up = g * v / v.norm(dim=(1, 2), keepdim=True)
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), up, state[f"ups.{i}.bias"], rate, (kernel - rate) // 2)
        total = 0
        for j, dilations in enumerate(config["resblock_dilation_sizes"]):
            y = x
            for k, dilation in enumerate(dilations):
                inner = conv(F.leaky_relu(y, 0.1), f"resblocks.{i * n_blocks + j}.convs1.{k}", dilation)
                y = conv(F.leaky_relu(inner, 0.1), f"resblocks.{i * n_blocks + j}.convs2.{k}") + y
            total = total + y
        x = total / n_blocks
    return torch.tanh(conv(F.leaky_relu(x), "conv_post"))[0, 0]  # F.leaky_relu's default slope, as fairseq


def _write_state(folder: Path, generator: dict) -> None:
    torch.save({"generator": generator}, folder / CHECKPOINT_FILE)


def _generator_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / CHECKPOINT_FILE, weights_only=True)["generator"]


# ---------------------------------------------------------------------------------------------------------
# fairseq's format
# ---------------------------------------------------------------------------------------------------------


def test_unfolded_names_are_fairseqs() -> None:
    state = build_tiny_vocoder().state_dict()
    assert set(state) == _fairseq_keys(n_levels=5, blocks_per_level=3)
    for key in ("conv_pre.weight_g", "ups.0.weight_v", "resblocks.0.convs1.0.weight_g", "dict.weight",
                "dur_predictor.proj.weight", "dur_predictor.conv1.0.weight"):  # fmt: skip
        assert key in state
    assert state["conv_pre.weight_g"].shape == (32, 1, 1)  # Conv1d: one magnitude per output channel
    # ConvTranspose1d weights are (in, out, k) and torch's weight_norm uses dim 0: per *input* channel.
    assert state["ups.0.weight_v"].shape == (32, 16, 11)
    assert state["ups.0.weight_g"].shape == (32, 1, 1)
    assert state["dict.weight"].shape == (1000, 16)


def test_fairseq_file_round_trip(tmp_path: Path, units: list[int]) -> None:
    unfolded = build_tiny_vocoder(seed=3)
    save_fairseq_checkpoint(unfolded, tmp_path)
    stored = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert list(stored) == ["generator"]
    assert set(stored["generator"]) == set(unfolded.state_dict())

    folded = load_vocoder(tmp_path, device="cpu")
    assert folded.is_folded and not unfolded.is_folded
    assert not any(name.endswith(("weight_g", "weight_v")) for name in folded.state_dict())
    assert torch.equal(folded.durations(units), unfolded.durations(units))
    assert (folded(units) - unfolded(units)).abs().max() <= 1e-5


def test_folding_matches_torchs_weight_norm(tmp_path: Path) -> None:
    """Our w = g·v/‖v‖ equals what fairseq's remove_weight_norm() leaves, for convs and transposed convs."""
    unfolded = build_tiny_vocoder(seed=1)
    state = unfolded.state_dict()
    folded = copy.deepcopy(unfolded)
    folded.fold_weight_norm()
    for name in ("conv_pre", "ups.0", "ups.4", "resblocks.7.convs1.2", "conv_post"):
        ours = folded.get_submodule(name)
        reference = copy.deepcopy(ours)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the classic API fairseq uses is deprecated
            torch.nn.utils.weight_norm(reference)
            reference.weight_g.data = state[f"{name}.weight_g"].clone()
            reference.weight_v.data = state[f"{name}.weight_v"].clone()
            torch.nn.utils.remove_weight_norm(reference)
        torch.testing.assert_close(ours.weight, reference.weight, rtol=0, atol=1e-7)


def test_matches_fairseqs_forward(tiny_folder: Path, vocoder: UnitVocoder, units: list[int]) -> None:
    """Loaded and folded, our vocoder equals fairseq's forward run on the raw (unfolded) checkpoint."""
    with torch.no_grad():
        reference = _reference_wave(_generator_state(tiny_folder), units)
    wave = vocoder(units)
    assert wave.shape == reference.shape
    assert (wave - reference).abs().max() <= 1e-5


def test_load_casts_to_the_requested_dtype(tiny_folder: Path, vocoder: UnitVocoder, units: list[int]) -> None:
    wide = load_vocoder(tiny_folder, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in wide.parameters()} == {torch.float64}
    assert not any(p.requires_grad for p in wide.parameters()) and not wide.training
    assert (wide(units).float() - vocoder(units)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# Offline output
# ---------------------------------------------------------------------------------------------------------


def test_tiny_vocoder_speaks(vocoder: UnitVocoder, units: list[int]) -> None:
    durations = vocoder.durations(units)
    wave = vocoder(units)
    assert vocoder.samples_per_frame == HOP and vocoder.sample_rate_hz == 16_000
    assert durations.shape == (N_UNITS,) and durations.dtype == torch.long
    assert int(durations.min()) >= 1 and len(durations.unique()) >= 3  # durations vary, mostly 1–4 frames
    assert wave.shape == (int(durations.sum()) * HOP,)
    assert float(wave.abs().max()) <= 1.0 and float(wave.std()) > 0.05


def test_negative_units_are_dropped(vocoder: UnitVocoder, units: list[int]) -> None:
    with_gaps = units[:10] + [-1] + units[10:50] + [-1, -1] + units[50:]
    assert torch.equal(vocoder.durations(with_gaps), vocoder.durations(units))
    assert torch.equal(vocoder(with_gaps), vocoder(units))
    assert vocoder([-1, -1]).shape == (0,)


def test_without_duration_prediction_each_unit_is_one_frame(vocoder: UnitVocoder, units: list[int]) -> None:
    assert vocoder(units, dur_prediction=False).shape == (N_UNITS * HOP,)


def test_unit_outside_vocabulary_is_an_input_error(vocoder: UnitVocoder) -> None:
    with pytest.raises(InputError, match="`1000`"):
        vocoder([5, 1000])


# ---------------------------------------------------------------------------------------------------------
# Receptive fields
# ---------------------------------------------------------------------------------------------------------


def test_release_reach_is_21_frames_each_side() -> None:
    # By hand, from frame 0's samples 0…319 backwards: conv_post ±3, each level's widest block (kernel 11,
    # dilations 1,3,5) ±60, then the transposed convs: [-63, 382] → [-32, 191] → [-47, 126] → [-28, 47]
    # → [-23, 27] → [-18, 18] (with ±60 between), and conv_pre ±3: frames −21 … 21.
    assert generator_reach_frames(parse_vocoder_config(RELEASE_CONFIG)) == (21, 21)


def test_reach_bounds_the_influence_of_a_frame(vocoder: UnitVocoder) -> None:
    """In float64, changing frame f moves no sample outside frames f − lookahead … f + context."""
    model = copy.deepcopy(vocoder).double()
    n_frames, frame = 80, 40
    x = model.dict(torch.arange(n_frames) * 7).T[None]  # (1, C, T)
    bumped = x.clone()
    bumped[0, :, frame] += 10.0
    changed = torch.nonzero(model.generate(x)[0, 0] != model.generate(bumped)[0, 0]).flatten()  # samples
    first, last = int(changed[0]) // HOP, int(changed[-1]) // HOP
    assert frame - model.lookahead_frames <= first and last <= frame + model.context_frames
    # …and not by much: the influence is measurable (in float64) up to one frame inside the bound.
    assert first <= frame - model.lookahead_frames + 1 and last >= frame + model.context_frames - 1


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------


def _stream(vocoder: UnitVocoder, units: list[int], chunk_units: int, **kwargs: int) -> list[np.ndarray]:
    """Push `units` in uneven pieces (1–9 units, some -1 padding mixed in), then flush; one array per call."""
    rng = np.random.default_rng(chunk_units)
    stream = VocoderStream(vocoder, chunk_units, **kwargs)
    outputs, i = [], 0
    while i < len(units):
        size = int(rng.integers(1, 10))
        outputs.append(stream.push(units[i : i + size] + [-1] * int(rng.integers(0, 2))))
        i += size
    outputs.append(stream.flush())
    return outputs


@pytest.mark.parametrize(
    ("chunk_units", "n_units"),
    [(1, SHORT_UNITS), pytest.param(1, N_UNITS, marks=pytest.mark.slow), (7, N_UNITS), (40, N_UNITS),
     (N_UNITS, N_UNITS)],
)  # fmt: skip
def test_stream_equals_offline(vocoder: UnitVocoder, units: list[int], chunk_units: int, n_units: int) -> None:
    """Chunks of 1 unit (a vocoder call per unit) run on a short answer by default; `slow` adds them on the
    whole answer, as the other chunk sizes run."""
    units = units[:n_units]
    offline = vocoder(units).numpy()
    outputs = _stream(vocoder, units, chunk_units)
    streamed = np.concatenate(outputs)
    assert streamed.dtype == np.float32 and streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() <= STREAM_TOLERANCE
    joins = np.cumsum([len(o) for o in outputs if len(o)])[:-1]
    if chunk_units < len(units):
        assert len(joins) >= 2  # audio really arrived before the end
    for join in joins:  # no click: the samples either side of every join are the offline ones
        assert np.abs(streamed[join - 2 : join + 2] - offline[join - 2 : join + 2]).max() <= STREAM_TOLERANCE


def test_stream_emits_whole_chunks_of_units(vocoder: UnitVocoder, units: list[int]) -> None:
    chunk = 40
    unit_ends = np.cumsum(vocoder.durations(units).numpy()) * HOP
    chunk_ends = {0, *unit_ends[chunk - 1 :: chunk].tolist()}
    emitted = np.cumsum([len(o) for o in _stream(vocoder, units, chunk)[:-1]])
    assert set(emitted.tolist()) <= chunk_ends  # before flush, audio ends only at chunk boundaries


def test_flush_starts_a_new_utterance(vocoder: UnitVocoder, units: list[int]) -> None:
    stream = VocoderStream(vocoder, 7)
    first = np.concatenate([stream.push(units[:60]), stream.flush()])
    second = np.concatenate([stream.push(units[:60]), stream.flush()])
    assert np.array_equal(first, second) and stream.emitted_samples == 0


def test_missing_context_clicks(vocoder: UnitVocoder, units: list[int]) -> None:
    """The checks above can fail: without context and lookahead, or the authors' way, joins differ."""
    offline = vocoder(units).numpy()
    blind = np.concatenate(_stream(vocoder, units, 7, context_frames=0, lookahead_frames=0))
    assert np.abs(blind - offline).max() > 100 * STREAM_TOLERANCE
    # The authors' Gradio client: vocode each 40 new units alone and concatenate
    # (docs/authors-behaviour.md#streaming-and-vocoding).
    alone = vocoder(units[:40]).numpy()
    assert np.abs(alone[-HOP:] - offline[len(alone) - HOP : len(alone)]).max() > 100 * STREAM_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------------------


def test_a_single_other_g_file_is_found(tiny_folder: Path, tmp_path: Path, units: list[int]) -> None:
    (tmp_path / CONFIG_FILE).write_bytes((tiny_folder / CONFIG_FILE).read_bytes())
    (tmp_path / "g_00400000").write_bytes((tiny_folder / CHECKPOINT_FILE).read_bytes())
    assert load_vocoder(tmp_path, device="cpu")(units[:20]).numel() > 0
    (tmp_path / "g_00300000").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several"):
        load_vocoder(tmp_path, device="cpu")


def test_missing_files(tiny_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_vocoder(tmp_path, device="cpu")
    (tmp_path / CONFIG_FILE).write_bytes((tiny_folder / CONFIG_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="no vocoder checkpoint"):
        load_vocoder(tmp_path, device="cpu")


@pytest.fixture
def tiny_copy(tiny_folder: Path, tmp_path: Path) -> Path:
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        (tmp_path / name).write_bytes((tiny_folder / name).read_bytes())
    return tmp_path


def test_missing_and_unexpected_keys(tiny_copy: Path) -> None:
    state = _generator_state(tiny_copy)
    del state["resblocks.3.convs2.1.weight_v"]
    state["spkr.weight"] = torch.zeros(200, 16)
    _write_state(tiny_copy, state)
    expected = r"missing `resblocks\.3\.convs2\.1\.weight_v`.*unexpected `spkr\.weight`"
    with pytest.raises(CheckpointError, match=expected):
        load_vocoder(tiny_copy, device="cpu")


def test_shape_mismatch(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / CONFIG_FILE).read_text())
    (tiny_copy / CONFIG_FILE).write_text(json.dumps({**config, "upsample_initial_channel": 64}))
    with pytest.raises(CheckpointError, match="`conv_pre.bias` has shape"):
        load_vocoder(tiny_copy, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"upsample_rates": None}, "lacks `upsample_rates`"),
        ({"upsample_rates": "5,4,4,2,2"}, "malformed"),
        ({"f0": True}, "F0-conditioned"),
        ({"multispkr": True}, "multi-speaker"),
        ({"resblock": "3"}, "resblock"),
        ({"upsample_kernel_sizes": [10, 8, 8, 4, 4]}, "even number"),
        ({"dur_predictor_params": {**TINY_VOCODER_CONFIG["dur_predictor_params"], "var_pred_kernel_size": 5}},
         "var_pred_kernel_size"),
    ],
)  # fmt: skip
def test_bad_config(tiny_copy: Path, change: dict, message: str) -> None:
    config = {k: v for k, v in {**TINY_VOCODER_CONFIG, **change}.items() if v is not None}
    (tiny_copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_vocoder(tiny_copy, device="cpu")


def test_config_that_is_not_json(tiny_copy: Path) -> None:
    (tiny_copy / CONFIG_FILE).write_text("{upsample_rates: [5,")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_vocoder(tiny_copy, device="cpu")


def test_unknown_config_keys_are_kept(vocoder: UnitVocoder) -> None:
    assert vocoder.config.to_dict()["segment_size"] == 8960


class _Trap:
    """Unpickling this calls a function: exactly what weights_only loading must refuse to do."""

    def __reduce__(self) -> tuple:
        return (print, ("unpickled code ran",))


def test_pickled_objects_are_refused(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"generator": _generator_state(tiny_copy), "trap": _Trap()}, tiny_copy / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="Python objects") as info:
        load_vocoder(tiny_copy, device="cpu")
    assert "state_dict" in (info.value.hint or "")
    assert "unpickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content", [b"not a checkpoint", None, {"model": {}}, {"generator": {"dict.weight": 3}}], ids=str
)
def test_unusable_checkpoints(tiny_copy: Path, content: object) -> None:
    path = tiny_copy / CHECKPOINT_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError):
        load_vocoder(tiny_copy, device="cpu")
