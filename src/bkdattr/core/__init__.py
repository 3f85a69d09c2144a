"""The engine: model loading, architecture adapter, hooks, forward passes, decoding, scoring, run
folders and options. A core module imports only core."""
