"""The run time that drives the network: the prompt, the prefill (with the extractor), generation and its
events, the `Engine` front door, spoken sessions, long recordings (with their speech-token cache) and the
voice that speaks answers. The network itself is `lyra_cli.engine.model`."""
