"""lyra: run, train and evaluate Lyra, the speech-centric omni-modal model."""

__version__ = "0.1.0"
