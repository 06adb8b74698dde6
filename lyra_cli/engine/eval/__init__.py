"""Benchmark evaluation: metrics as pure functions (`metrics`), the MM-Vet export and judge (`mmvet`).

Nothing here imports torch or a model at import time; the WER metrics import `jiwer` and openai-whisper's
text normaliser only when called.
"""
