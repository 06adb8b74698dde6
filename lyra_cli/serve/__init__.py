"""`lyra serve`: Lyra behind OpenAI's Chat Completions API, and a web page to talk to it.

The server is a thin HTTP layer over the engine's public API (`lyra_cli.engine`): it translates requests
into conversations and parts, runs them one at a time, and translates the engine's events into OpenAI's
response and chunk objects. It never prints; `lyra_cli.commands.serve` starts it."""
