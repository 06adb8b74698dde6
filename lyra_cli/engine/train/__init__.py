"""Training-only pieces of the engine: losses and regularisers that inference never imports (`lcmr`)."""
