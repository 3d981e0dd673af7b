"""`tgi bench serve` without the terminal: prompts, warm-up, levels, metrics, one result.

The CLI wraps `run_serve` with a progress bar and tables; scripts can call it directly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tgi.bench.client import Api, StreamClient, fetch_server_info, wait_ready
from tgi.bench.dataset import file_requests, random_requests
from tgi.bench.loadgen import Level, run_level, warm_up
from tgi.bench.metrics import SLO, compute_metrics
from tgi.bench.records import BenchRequest, RequestOutcome
from tgi.bench.results import (
    Environment,
    LevelResult,
    ServeParameters,
    ServeResult,
    cpu_pressure,
    now_iso,
)

__all__ = ["LevelProgress", "build_levels", "build_requests", "run_serve"]

logger = logging.getLogger(__name__)

# Called when a level starts with (level, its index, the number of levels); returns the
# callback each finished request is passed to.
LevelProgress = Callable[[Level, int, int], Callable[[RequestOutcome], None]]


def build_levels(
    concurrency: Sequence[int],
    request_rates: Sequence[float],
    max_concurrency: int | None,
    num_prompts: Sequence[int],
) -> list[Level]:
    """The run's levels: every rate with every concurrency (or with `max_concurrency`).

    `num_prompts` is one count for all levels or one per level.
    """
    rates = list(request_rates) or [math.inf]
    caps: list[int | None] = list(concurrency) if concurrency else [max_concurrency]
    pairs = [(rate, cap) for rate in rates for cap in caps]
    if len(num_prompts) not in (1, len(pairs)):
        raise ValueError(
            f"--num-prompts gives {len(num_prompts)} counts for {len(pairs)} levels: "
            "give one, or one per level"
        )
    counts = list(num_prompts) * len(pairs) if len(num_prompts) == 1 else list(num_prompts)
    for rate, cap in pairs:
        if rate <= 0 or (cap is not None and cap < 1):
            raise ValueError("request rates and concurrencies must be positive")
    if any(count < 1 for count in counts):
        raise ValueError("--num-prompts must be at least 1")
    return [Level(rate, cap, count) for (rate, cap), count in zip(pairs, counts, strict=True)]


def build_requests(
    parameters: ServeParameters, tokenizer: Any, count: int, *, seed_offset: int = 0
) -> list[BenchRequest]:
    """`count` prompts as `parameters` describe them (random, or from the prompt file)."""
    seed = parameters.seed + seed_offset
    if parameters.dataset == "random":
        if parameters.input_len is None or parameters.output_len is None:
            raise ValueError("a random dataset needs --input-len and --output-len")
        return random_requests(
            tokenizer,
            count,
            parameters.input_len,
            parameters.output_len,
            range_ratio=parameters.range_ratio,
            seed=seed,
        )
    return file_requests(
        Path(parameters.dataset), tokenizer, count, output_len=parameters.output_len, seed=seed
    )


def _default_model(info: dict[str, Any]) -> str | None:
    """The first model an OpenAI server lists, which is what it serves."""
    models = info.get("/v1/models")
    if isinstance(models, dict):
        data = models.get("data") or models.get("models") or []
        if data and isinstance(data[0], dict):
            name = data[0].get("id") or data[0].get("name")
            return str(name) if name else None
    return None


async def run_serve(
    parameters: ServeParameters,
    levels: Sequence[Level],
    tokenizer: Any,
    *,
    label: str,
    command: Sequence[str],
    slo: SLO | None = None,
    wait_s: float = 0.0,
    keep_requests: bool = True,
    progress: LevelProgress | None = None,
) -> ServeResult:
    """Warm the server up, run every level, and return the whole result.

    Raises `ConnectionError` when the server is not ready within `wait_s` seconds.
    """
    environment = Environment.collect()  # load average before we add any
    api = Api(parameters.api)
    if wait_s > 0 and not await wait_ready(parameters.base_url, wait_s):
        raise ConnectionError(f"{parameters.base_url} was not ready within {wait_s:g} s")
    info = await fetch_server_info(parameters.base_url, api)
    model = parameters.model
    if model is None and api is not Api.TGI:
        model = _default_model(info)
    if model != parameters.model:
        parameters = dataclasses.replace(parameters, model=model)
    most = max(level.num_requests for level in levels)
    requests = build_requests(parameters, tokenizer, most)
    warmups = build_requests(parameters, tokenizer, parameters.warmup_requests, seed_offset=1)
    client = StreamClient(
        parameters.base_url,
        api,
        endpoint=parameters.endpoint,
        model=model,
        ignore_eos=parameters.ignore_eos,
        extra_body=parameters.extra_body,
        timeout_s=parameters.timeout_s,
        count_tokens=lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
    )
    results = []
    async with client:
        concurrency = max((lv.max_concurrency or 1) for lv in levels)
        await warm_up(client, warmups, min(concurrency, max(1, len(warmups))))
        for index, level in enumerate(levels):
            on_done = progress(level, index, len(levels)) if progress else None
            run = await run_level(
                client,
                requests[: level.num_requests],
                level,
                burstiness=parameters.burstiness,
                seed=parameters.seed + index,
                on_done=on_done,
            )
            results.append(
                LevelResult(
                    request_rate=None if math.isinf(level.request_rate) else level.request_rate,
                    max_concurrency=level.max_concurrency,
                    metrics=compute_metrics(run.outcomes, run.duration_s, slo),
                    requests=tuple(run.outcomes) if keep_requests else (),
                    cpu_pressure=cpu_pressure(),
                )
            )
            _warn_if_contended(level, results[-1])
    return ServeResult(
        label=label,
        created=now_iso(),
        command=tuple(command),
        environment=environment,
        parameters=parameters,
        server_info=info,
        levels=tuple(results),
    )


# PSI "some" share above which a level's numbers say more about the machine than the server
_CONTENDED_PSI = 10.0


def _warn_if_contended(level: Level, result: LevelResult) -> None:
    pressure = result.cpu_pressure
    if pressure is not None and pressure[1] > _CONTENDED_PSI:
        logger.warning(
            "%s: tasks waited for a CPU %.0f%% of the last minute (PSI); other work "
            "competed with this measurement",
            level.label,
            pressure[1],
        )
