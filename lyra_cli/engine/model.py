"""The Lyra module tree, named so that its state dict matches the release checkpoint keys.

    lm_head                                   Linear(H, vocab)
    model.embed_tokens / layers.{i} / norm    our Qwen2-VL text decoder (llm.py)
    model.vision_tower.vision_tower.*         transformers' Qwen2-VL ViT with its patch merger (output width H)
    model.speech_tower.speech_tower.*         transformers' Whisper encoder
    model.mm_speech_projector.linear{1,2}.*   concat-k MLP speech projector

The towers are transformers modules: they are frozen in every training stage and equal their public
weights, so there is nothing to gain from owning them (DESIGN.md decision 2).
"""

from __future__ import annotations

import torch
from torch import nn

from lyra_cli.engine.config import LyraConfig, SpeechConfig
from lyra_cli.engine.llm import LyraTextModel


class SpeechProjector(nn.Module):
    """Concatenate `ds_rate` consecutive encoder frames, then Linear → ReLU → Linear into the LLM width."""

    def __init__(self, speech: SpeechConfig, llm_hidden: int) -> None:
        super().__init__()
        self.ds_rate = speech.ds_rate
        self.linear1 = nn.Linear(speech.ds_rate * speech.encoder_hidden_size, speech.projector_hidden)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(speech.projector_hidden, llm_hidden)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, F, E) → tokens (B, F // ds_rate, H); trailing frames that do not fill a group are dropped."""
        batch, n_frames, width = frames.shape
        n_tokens = n_frames // self.ds_rate
        grouped = frames[:, : n_tokens * self.ds_rate].reshape(batch, n_tokens, self.ds_rate * width)
        return self.linear2(self.relu(self.linear1(grouped)))


class VisionTower(nn.Module):
    """Holds the ViT under the attribute name the checkpoint uses (`vision_tower.vision_tower.*`)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vision_tower = vit


class SpeechTower(nn.Module):
    """Holds the Whisper encoder under the attribute name the checkpoint uses (`speech_tower.speech_tower.*`)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.speech_tower = encoder


class LyraBackbone(LyraTextModel):
    """The text decoder plus the multimodal members that live under `model.` in the checkpoint."""

    def __init__(self, config: LyraConfig, vit: nn.Module | None, whisper: nn.Module | None) -> None:
        super().__init__(config.text)
        self.vision_tower = VisionTower(vit) if vit is not None else None
        self.speech_tower = SpeechTower(whisper) if whisper is not None else None
        self.mm_speech_projector = (
            SpeechProjector(config.speech, config.text.hidden_size) if config.speech is not None else None
        )


class LyraForCausalLM(nn.Module):
    def __init__(self, config: LyraConfig, vit: nn.Module | None, whisper: nn.Module | None) -> None:
        super().__init__()
        self.config = config
        self.model = LyraBackbone(config, vit, whisper)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) after the final norm → logits (B, T, vocab) in fp32 for stable sampling, on the
        hidden states' device (lm_head may sit on another one in a spread model)."""
        return self.lm_head(hidden.to(self.lm_head.weight.device)).float().to(hidden.device)
