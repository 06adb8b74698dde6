"""Command-line commands: parse, validate, call the engine, render its events."""
