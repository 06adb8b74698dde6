"""The Python API (`lyra_cli.engine`): README.md's example runs as written, `generate` is `respond` run to its
`Done`, and errors name settings for a library caller and flags on the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import lyra_cli.engine as api
from lyra_cli.commands.common import flag_for
from lyra_cli.engine.run.extractor import parse_extract
from lyra_cli.errors import CheckpointError, RuntimeSetupError, UsageError
from lyra_cli.main import run

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_python_example() -> str:
    """The ```python block of README.md's "Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Python API section has one complete example"
    return blocks[0]


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> object:
    return api.load(tiny_dir)


def test_readme_example_runs_as_written(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the example's relative paths, from its own folder
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102
    out = capsys.readouterr().out
    summary = re.search(r"\[(\d+) tokens, (\w+) adapter, [0-9.]+s\]", out)
    assert summary is not None, out
    assert int(summary.group(1)) > 0 and summary.group(2) == "speech"  # a spoken question routes to speech
    assert out[: summary.start()].strip()  # the streamed text came first
    wav, rate = sf.read(tmp_path / "answer.wav", dtype="float32")
    assert rate > 0 and len(wav) > 0 and np.isfinite(wav).all()


def test_the_package_exports_the_api_without_importing_torch() -> None:
    code = "import sys, lyra_cli.engine as e; print('TORCH', 'torch' in sys.modules, sorted(e.__all__) == e.__all__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TORCH False" in result.stdout
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    assert api.Conversation().system == api.DEFAULT_SYSTEM_PROMPT
    with pytest.raises(AttributeError):
        api.no_such_name  # noqa: B018


def test_generate_is_respond_run_to_done(engine: api.Engine) -> None:
    question = [api.TextPart("Say something.")]
    sampling = engine.sampling(max_new_tokens=6)
    streamed = list(engine.respond(api.Conversation(), question, sampling))
    seen: list[object] = []
    conversation = api.Conversation()
    done = engine.generate(conversation, question, sampling, on_event=seen.append)
    assert not any(isinstance(event, api.Done) for event in seen)  # Done is returned, not handed over
    assert [type(e) for e in seen] == [type(e) for e in streamed[:-1]]
    assert done.text == streamed[-1].text == "".join(e.text for e in seen if isinstance(e, api.TextDelta)).strip()
    assert conversation.turns[-1].answer == done.text  # the turn joined the conversation


def test_generate_drops_a_turn_its_callback_interrupts(engine: api.Engine) -> None:
    conversation = api.Conversation()

    def stop(event: object) -> None:
        if isinstance(event, api.TextDelta):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(conversation, [api.TextPart("Say something.")], engine.sampling(max_new_tokens=6),
                        on_event=stop)  # fmt: skip
    assert conversation.turns == []


def test_engine_errors_name_settings_and_the_cli_names_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError) as bad_device:
        api.load("tiny", device="tpu")
    assert bad_device.value.setting == "device" and str(bad_device.value) == "unknown device value `tpu`"
    assert bad_device.value.render(flag_for)[0] == "unknown --device value `tpu`"
    with pytest.raises(UsageError) as bad_extract:
        parse_extract("4y0.7", num_layers=4)
    assert bad_extract.value.setting == "extract" and "--" not in str(bad_extract.value) + bad_extract.value.hint
    with pytest.raises(UsageError) as bad_temperature:
        api.SamplingConfig(temperature=-1).validate()
    assert bad_temperature.value.setting == "temperature"
    assert "--" not in str(bad_temperature.value) + (bad_temperature.value.hint or "")
    assert run(["chat", "--text", "hi", "--temperature", "-1"]) == 2
    assert "error: bad --temperature value `-1.0`" in capsys.readouterr().err
    assert run(["chat", "--text", "hi", "--extract", "4y0.7"]) == 2
    assert "error: cannot read --extract `4y0.7`" in capsys.readouterr().err


def test_missing_cuda_is_a_setting_error_without_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeSetupError) as no_gpu:
        api.load("tiny", device="cuda")
    assert no_gpu.value.setting == "device" and no_gpu.value.hint == "use device cpu or auto"
    assert no_gpu.value.render(flag_for) == ("`--device cuda` was asked for but no CUDA GPU is visible",
                                             "use --device cpu or auto")  # fmt: skip


def test_an_empty_turn_names_the_text_input(engine: api.Engine) -> None:
    from lyra_cli.errors import InputError

    with pytest.raises(InputError) as empty:
        engine.generate(api.Conversation(), [])
    assert empty.value.setting == "text" and empty.value.hint == "give text or media"
    assert empty.value.render(flag_for)[1] == "give --text or media"


def test_grouped_load_settings_are_checked_before_any_weights_load(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as cpu_map:
        api.load("tiny", device="cpu", device_map=api.DeviceMap(max_memory="cpu=1GiB"))
    assert cpu_map.value.setting == "device_map"
    assert cpu_map.value.render(flag_for)[0] == "--device-map auto spreads over GPUs; it cannot go with --device cpu"
    missing = tmp_path / "no-such-vit"
    with pytest.raises(CheckpointError) as no_folder:
        api.load("tiny", towers=api.TowerOverrides(vision=str(missing)))  # a str is a path
    assert str(no_folder.value) == f"--vision-tower `{missing}` is not a folder"
