"""Audio input and output: decoding, windows, log-mel features."""
