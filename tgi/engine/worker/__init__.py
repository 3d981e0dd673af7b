"""The engine in a process of its own: `WorkerEngine` (client.py) in the HTTP process
drives `serve` (serve.py) in the worker over a `Channel` (channel.py)."""
