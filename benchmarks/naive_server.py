"""The naive baseline: transformers `generate()`, one request at a time, streamed as TGI does.

What a user gets by wrapping `model.generate()` in a web server: no batching, requests
wait in line for the model. It serves TGI's `POST /generate_stream` (one SSE `data:`
event per token, `generated_text` and `details` on the last), `GET /health` and
`GET /info`, so `tgi bench serve --api tgi` measures it exactly as it measures tgi.

    .venv/bin/python benchmarks/naive_server.py --port 8082            # embedded SmolLM2
    .venv/bin/python benchmarks/naive_server.py --model /path/to/dir --threads 2

`ignore_eos` is honoured with `min_new_tokens = max_new_tokens` (EOS is masked until
then: the tokens after a would-be EOS differ from vLLM's ignore_eos, the cost does not).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger("naive_server")

_END = object()


class Parameters(BaseModel):
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    details: bool = False
    ignore_eos: bool = False


class GenerateRequest(BaseModel):
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)


class _QueueStreamer(BaseStreamer):
    """Hands each generated token id to the event loop; `generate()` calls it per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self.loop = loop
        self.queue = queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt itself
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, _END)


class _Cancelled(StoppingCriteria):
    """Stops generate() at the next step once the client has gone away."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool)


class NaiveModel:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.lock = asyncio.Lock()  # one request at a time: the whole point of the baseline

    def generate(
        self, prompt: str, parameters: Parameters, streamer: BaseStreamer, cancel: threading.Event
    ) -> None:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = parameters.max_new_tokens
        config.do_sample = parameters.do_sample
        if parameters.do_sample:
            config.temperature = parameters.temperature or 1.0
            config.top_p = parameters.top_p or 1.0
        if parameters.ignore_eos:
            # transformers falls back to the model's EOS when generation_config has none,
            # so the only way to run to max_new_tokens is to forbid EOS until then
            config.min_new_tokens = parameters.max_new_tokens
        config.pad_token_id = self.tokenizer.eos_token_id
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                streamer=streamer,
                stopping_criteria=[_Cancelled(cancel)],
            )


def create_app(naive: NaiveModel) -> FastAPI:
    app = FastAPI(title="naive transformers generate() baseline")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({})

    @app.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse(
            {
                "model_id": str(naive.path),
                "router": "naive generate(), one request at a time",
                "torch_threads": torch.get_num_threads(),
                "model_dtype": "float32",
            }
        )

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest) -> StreamingResponse:
        return StreamingResponse(_events(naive, body), media_type="text/event-stream")

    return app


async def _events(naive: NaiveModel, body: GenerateRequest) -> AsyncIterator[str]:
    async with naive.lock:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        streamer = _QueueStreamer(loop, queue)
        input_length = len(naive.tokenizer(body.inputs).input_ids)
        work = loop.run_in_executor(
            None, naive.generate, body.inputs, body.parameters, streamer, cancel
        )
        tokens: list[int] = []
        stops = set() if body.parameters.ignore_eos else naive.eos_token_ids
        try:
            while (token := await queue.get()) is not _END:
                tokens.append(token)
                # known at once, so no token waits for the next: max length or an EOS
                last = len(tokens) >= body.parameters.max_new_tokens or token in stops
                yield (
                    "data: " + json.dumps(_event(naive, tokens, body, input_length, last)) + "\n\n"
                )
        finally:
            cancel.set()  # a no-op when finished; stops generate() when the client left
            await work


def _event(
    naive: NaiveModel, tokens: list[int], body: GenerateRequest, input_length: int, last: bool
) -> dict[str, Any]:
    token = tokens[-1]
    event: dict[str, Any] = {
        "index": len(tokens),
        "token": {
            "id": token,
            "text": naive.tokenizer.decode([token]),
            "logprob": None,
            "special": token in naive.tokenizer.all_special_ids,
        },
        "top_tokens": [],
        "generated_text": naive.tokenizer.decode(tokens, skip_special_tokens=True)
        if last
        else None,
        "details": None,
    }
    if last and body.parameters.details:
        event["details"] = {
            "finish_reason": "length"
            if len(tokens) >= body.parameters.max_new_tokens
            else "eos_token",
            "generated_tokens": len(tokens),
            "input_length": input_length,
            "seed": None,
        }
    return event


def _model_dir(spec: str | None) -> Path:
    """A local model directory, or any model id `tgi serve` accepts (default: SmolLM2)."""
    if spec is not None and Path(spec).is_dir():
        return Path(spec)
    from tgi.config import resolve_config, snapshot_environ
    from tgi.models.source import inspect_model, materialize

    config = resolve_config({"model_id": spec}, snapshot_environ())
    return materialize(inspect_model(config), config).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir or id; default SmolLM2")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    naive = NaiveModel(_model_dir(args.model))
    logger.info("serving %s on http://%s:%d", naive.path, args.host, args.port)
    uvicorn.run(create_app(naive), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
