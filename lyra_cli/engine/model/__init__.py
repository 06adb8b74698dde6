"""The network and its loading: the checkpoint's config and weights, the decoder and its KV cache, the vision
and speech towers, the speech generator and the vocoder, quantization, device placement, the tokenizer, the
LoRA adapters, and the tiny random model. What runs it turn by turn is `lyra_cli.engine.run`."""
