"""The lyra library: model, loading, preprocessing, generation. Never prints; logs through `logging`."""
