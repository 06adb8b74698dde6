"""The extractor in training (`engine/train/extractor_forward.py`): the same drops as inference, gradients through
the survivors, answers never dropped, and `--extract` wired through the stages and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.synthetic import write_synthetic_set
from torch import Tensor, nn

from lyra_cli.engine.model.config import ExtractorConfig, TextModelConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import LyraTextModel
from lyra_cli.engine.run.extractor import context_mask, query_mask
from lyra_cli.engine.run.prefill import PrefillPlan, prefill
from lyra_cli.engine.run.prompt import TokenKind
from lyra_cli.engine.train.data import IGNORE_INDEX
from lyra_cli.engine.train.extractor_forward import forward_extracting
from lyra_cli.engine.train.loop import _shifted_ce
from lyra_cli.main import run

CONFIG = TextModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                         num_kv_heads=2, mrope_section=(2, 3, 3))  # fmt: skip
EXTRACTOR = ExtractorConfig(compress_gap=1, keep_rate=0.7)  # drops after layers 0, 1, 2
# system text, image, speech, question, answer (supervised), closing text
PROMPT = [(TokenKind.TEXT, 5), (TokenKind.IMAGE, 40), (TokenKind.SPEECH, 60), (TokenKind.TEXT, 9),
          (TokenKind.TEXT, 12), (TokenKind.TEXT, 2)]  # fmt: skip
ANSWER = slice(5 + 40 + 60 + 9, 5 + 40 + 60 + 9 + 12)
N_TOKENS = sum(n for _, n in PROMPT)
WEIGHT_STD = 0.15


class _Model(nn.Module):
    """A decoder plus lm_head: what `_shifted_ce` needs (`.logits`)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = LyraTextModel(CONFIG)
        self.lm_head = nn.Linear(CONFIG.hidden_size, CONFIG.vocab_size, bias=False)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)


@pytest.fixture(scope="module")
def setup() -> tuple[_Model, Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = _Model().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(float(name.endswith("norm.weight")) + WEIGHT_STD * torch.randn(p.shape, generator=gen))
    kinds = torch.cat([torch.full((n,), int(kind)) for kind, n in PROMPT])
    positions = torch.arange(N_TOKENS).expand(3, 1, -1)
    embeds = torch.randn(1, N_TOKENS, CONFIG.hidden_size, generator=gen)
    labels = torch.full((N_TOKENS,), IGNORE_INDEX)
    labels[ANSWER] = torch.randint(0, CONFIG.vocab_size, (ANSWER.stop - ANSWER.start,), generator=gen)
    return model, embeds, positions, kinds, labels


def _forward(setup, extractor: ExtractorConfig | None, is_query: Tensor | None = None, embeds: Tensor | None = None):  # noqa: ANN001, ANN202
    model, default_embeds, positions, kinds, _ = setup
    return forward_extracting(model.model, default_embeds if embeds is None else embeds, positions,
                              is_context=context_mask(kinds),
                              is_query=query_mask(kinds) if is_query is None else is_query, extractor=extractor)  # fmt: skip


def test_without_drops_it_is_exactly_the_model(setup) -> None:  # noqa: ANN001
    model, embeds, positions, _, _ = setup
    out = _forward(setup, None)
    assert torch.equal(out.hidden, model.model(embeds, positions)) and out.drops == []
    assert torch.equal(out.kept_index, torch.arange(N_TOKENS))


def test_training_drops_the_tokens_inference_drops(setup) -> None:  # noqa: ANN001
    """Same queries (no labels) -> same survivors, same drop counts, same last hidden state as prefill."""
    model, embeds, positions, kinds, _ = setup
    out = _forward(setup, EXTRACTOR)
    cache = KVCache.empty(CONFIG, capacity=N_TOKENS)
    with torch.no_grad():
        reference = prefill(model.model, embeds, positions, PrefillPlan(cache, extractor=EXTRACTOR), kinds=kinds)
    assert torch.equal(out.kept_index, reference.kept_index)
    assert out.drops == reference.drops and len(out.drops) == 3
    assert out.drops[-1].n_after < out.drops[0].n_before  # it really dropped
    torch.testing.assert_close(out.hidden[:, -1], reference.last_hidden, atol=1e-5, rtol=1e-5)


def test_answers_are_never_queries_nor_dropped(setup) -> None:  # noqa: ANN001
    _, _, _, kinds, labels = setup
    train_queries = query_mask(kinds) & (labels == IGNORE_INDEX)
    assert not bool(train_queries[ANSWER].any()) and bool(train_queries.any())
    out = _forward(setup, EXTRACTOR, is_query=train_queries)
    kept = set(out.kept_index.tolist())
    assert all(i in kept for i in range(ANSWER.start - 1, ANSWER.stop))  # answers and the token before them
    # the survivors differ from inference's, whose queries include the answer text
    assert not torch.equal(out.kept_index, _forward(setup, EXTRACTOR).kept_index)


def test_loss_and_gradients_flow_through_the_survivors(setup) -> None:  # noqa: ANN001
    """The loss over survivors equals running the kept set by hand; dropped tokens still get gradient
    (they were attended to before their drop), and every answer token is scored."""
    model, embeds, positions, kinds, labels = setup
    leaf = embeds.clone().requires_grad_(True)
    out = _forward(setup, EXTRACTOR, embeds=leaf)
    loss = _shifted_ce(model, out.hidden[0], labels, out.kept_index)
    loss.backward()
    assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all())
    dropped_early = sorted(set(range(N_TOKENS)) - set(out.kept_index.tolist()))[0]
    assert float(leaf.grad[0, dropped_early].abs().sum()) > 0
    # every supervised target is predicted: the loss over survivors is the loss over all the answer
    full = _forward(setup, None)
    logits = model.logits(full.hidden[0])
    reference = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)
    no_drop = _shifted_ce(model, full.hidden[0], labels, full.kept_index)
    torch.testing.assert_close(no_drop, reference, atol=1e-6, rtol=1e-6)
    assert abs(float(loss.detach()) - float(reference.detach())) > 1e-4  # the drops changed what the answer attended to


def test_nothing_supervised_is_a_zero_loss_in_the_graph(setup) -> None:  # noqa: ANN001
    model, embeds, positions, _, _ = setup
    leaf = embeds.clone().requires_grad_(True)
    out = _forward(setup, None, embeds=leaf)
    loss = _shifted_ce(model, out.hidden[0], torch.full((N_TOKENS,), IGNORE_INDEX), out.kept_index)
    assert float(loss.detach()) == 0.0 and loss.requires_grad


# ---------------------------------------------------------------------------------------------- stages, CLI


def test_dry_run_shows_the_extractor(tiny_dir: Path, real: Path, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:  # fmt: skip
    data = write_synthetic_set(tmp_path / "data", real, n_records=2, seed=0)  # a dry run checks the data too
    code = run(["train", "stage2", "--model", str(tiny_dir), "--data", str(data),
                "--out", str(tmp_path / "out"), "--extract", "2x0.7", "--dry-run"])  # fmt: skip
    assert code == 0
    assert '"extract": "2x0.7"' in capsys.readouterr().out


def test_a_bad_extract_spec_is_a_usage_error(tiny_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = run(["train", "stage2", "--model", str(tiny_dir), "--data", str(tmp_path / "none.json"),
                "--out", str(tmp_path / "out"), "--extract", "9x0.5", "--dry-run"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--extract" in err and "Traceback" not in err
