"""`tgi bench`: load generation against any TGI- or OpenAI-speaking server, and engine timing.

Modules, one job each:

- `dataset`: the prompts (seeded random token sequences, JSONL or ShareGPT files);
- `client`: one streamed request over HTTP, timed token by token (`RequestOutcome`);
- `loadgen`: arrivals (Poisson/gamma, or as fast as a concurrency cap allows) and levels;
- `metrics`: TTFT, TPOT, ITL, end-to-end latency, throughput, goodput as vLLM defines them;
- `report`: result files (JSON with machine, versions, command) and tables;
- `plot`: PNG comparisons of several result files;
- `engine`: prefill and decode latency straight from a backend, without HTTP;
- `synthetic`: a loopback SSE server with known delays and injectable failures;
- `cli`: the `tgi bench` typer commands.
"""

from __future__ import annotations

__all__: list[str] = []
