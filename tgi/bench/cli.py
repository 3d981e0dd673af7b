"""`tgi bench`: serve (load a server over HTTP), engine (time a backend), compare, synthetic."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from tgi.bench.metrics import SLO
from tgi.bench.records import Api, RequestOutcome
from tgi.bench.results import (
    ServeParameters,
    ServeResult,
    load_serve_result,
    merge_by_label,
    now_iso,
    write_json,
)

if TYPE_CHECKING:
    from tgi.bench.loadgen import Level

__all__ = ["bench_app"]

logger = logging.getLogger(__name__)

bench_app = typer.Typer(
    help="Benchmark a server over HTTP (TGI or OpenAI streaming) or a backend alone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# NOTE: `tgi` imports this module at start, so the client (httpx) and plotting
# (matplotlib) load inside the commands: `tgi serve` runs without the bench extra.

# a pipe or a file gets a wide table rather than one folded to 80 columns
_console = Console(width=None if sys.stdout.isatty() else 200)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(f"{flag} takes integers separated by commas: {text!r}") from None


def _rates(text: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(f"--request-rate takes numbers or inf: {text!r}") from None


# what the bench extra installs (import names): a missing one is a missing extra
_BENCH_EXTRA_MODULES = frozenset({"httpx", "zmq", "rich", "matplotlib"})


@contextmanager
def _bench_extra(command: str) -> Iterator[None]:
    """Turn the ModuleNotFoundError of a module the bench extra installs into an error
    that says which extra to install (exit status 1)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _BENCH_EXTRA_MODULES:
            raise
        typer.echo(
            f"error: `tgi bench {command}` needs the bench extra ({missing} is not "
            "installed): pip install 'tgi-server[bench]'",
            err=True,
        )
        raise typer.Exit(1) from None


def _setup_logging(verbose: bool) -> None:
    from tgi.logs import setup_logging

    setup_logging(level=logging.INFO if verbose else logging.WARNING)


class _RichProgress:
    """One bar per level, with the failures so far in its description."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __call__(self, level: Level, index: int, total: int) -> Callable[[RequestOutcome], None]:
        description = f"[{index + 1}/{total}] {level.label}"
        task: TaskID = self.progress.add_task(description, total=level.num_requests)
        failed = [0]

        def done(outcome: RequestOutcome) -> None:
            if not outcome.success:
                failed[0] += 1
                self.progress.update(
                    task, description=f"{description} [red]{failed[0]} failed[/red]"
                )
            self.progress.advance(task)

        return done


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console,
        transient=False,
    )


@bench_app.command("serve")
def serve(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(help="The server's base URL.")] = "http://127.0.0.1:3000",
    api: Annotated[Api, typer.Option(help="Streaming protocol.")] = Api.TGI,
    endpoint: Annotated[str | None, typer.Option(help="Path; default by --api.")] = None,
    model: Annotated[
        str | None, typer.Option(help="OpenAI `model`; default the first of /v1/models.")
    ] = None,
    label: Annotated[str | None, typer.Option(help="The system's name in tables.")] = None,
    dataset: Annotated[
        str, typer.Option(help="`random`, or a JSONL ({prompt, output_len}) / ShareGPT file.")
    ] = "random",
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer dir or model id for lengths; default embedded SmolLM2."),
    ] = None,
    input_len: Annotated[int, typer.Option(help="Random prompts: tokens each.")] = 128,
    output_len: Annotated[
        int | None, typer.Option(help="Tokens to generate (default 128 for random).")
    ] = None,
    range_ratio: Annotated[float, typer.Option(help="Random lengths vary by +-ratio.")] = 0.0,
    num_prompts: Annotated[
        str, typer.Option(help="Requests per level: one count, or one per level.")
    ] = "64",
    concurrency: Annotated[
        str | None, typer.Option(help="Concurrency sweep, e.g. 1,8,32,64 (rate: inf).")
    ] = None,
    request_rate: Annotated[
        str, typer.Option(help="Requests/s (Poisson arrivals), comma list; inf: all at once.")
    ] = "inf",
    burstiness: Annotated[
        float, typer.Option(help="Gamma shape of arrival gaps: 1 Poisson, <1 burstier.")
    ] = 1.0,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Cap on requests in flight in rate mode.")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Uncounted warm-up requests.")] = 2,
    ignore_eos: Annotated[
        bool, typer.Option(help="Ask for exactly --output-len tokens (vLLM's ignore_eos).")
    ] = True,
    goodput: Annotated[
        list[str] | None, typer.Option(help="SLOs in ms for goodput: ttft:500 tpot:50 e2el:X")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for prompts and arrivals.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds without a byte before failing.")] = 600,
    extra_body: Annotated[
        str | None, typer.Option(help="JSON merged into each request's parameters/body.")
    ] = None,
    wait: Annotated[float, typer.Option(help="Wait up to this many s for /health.")] = 0.0,
    output: Annotated[Path | None, typer.Option(help="Write the result JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the result here.")] = None,
    save_requests: Annotated[
        bool, typer.Option(help="Keep every request's timings in the JSON.")
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show a live progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Load a server with streamed requests and report TTFT, TPOT, ITL, latency, throughput."""
    _setup_logging(verbose)
    with _bench_extra("serve"):
        from tgi.bench.dataset import load_tokenizer
        from tgi.bench.serve import build_levels, run_serve

        if plot is not None:  # found out now, not after the run
            import matplotlib  # noqa: F401

    try:
        slo = SLO.parse(goodput or [])
        levels = build_levels(
            _ints(concurrency, "--concurrency") if concurrency else [],
            _rates(request_rate),
            max_concurrency,
            _ints(num_prompts, "--num-prompts"),
        )
        extra = json.loads(extra_body) if extra_body else {}
    except (ValueError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if output_len is None and dataset == "random":
        output_len = 128
    parameters = ServeParameters(
        base_url=url,
        api=api.value,
        endpoint=endpoint or api.default_endpoint,
        model=model,
        dataset=dataset,
        tokenizer=tokenizer,
        input_len=input_len if dataset == "random" else None,
        output_len=output_len,
        range_ratio=range_ratio,
        ignore_eos=ignore_eos,
        seed=seed,
        burstiness=burstiness,
        warmup_requests=warmup,
        timeout_s=timeout,
        slo_ms={k: v for k, v in _slo_dict(slo).items() if v is not None},
        extra_body=extra,
    )
    with _console.status("loading the tokenizer"):
        loaded = load_tokenizer(tokenizer)
    bar = _progress() if progress else None
    try:
        if bar is not None:
            bar.start()
        result = asyncio.run(
            run_serve(
                parameters,
                levels,
                loaded,
                label=label or _default_label(url, api),
                command=_command(ctx),
                slo=slo,
                wait_s=wait,
                keep_requests=save_requests,
                progress=_RichProgress(bar) if bar is not None else None,
            )
        )
    except ConnectionError as exc:
        _console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        if bar is not None:
            bar.stop()
    _show_serve(result)
    if output is not None:
        write_json(output, result)
        _console.print(f"result: {output}")
    if plot is not None:
        from tgi.bench.plot import plot_serve

        plot_serve([result], plot)
        _console.print(f"plot: {plot}")


def _slo_dict(slo: SLO) -> dict[str, float | None]:
    return {"ttft": slo.ttft_ms, "tpot": slo.tpot_ms, "e2el": slo.e2el_ms}


def _default_label(url: str, api: Api) -> str:
    return f"{api.value}@{url.split('://', 1)[-1].rstrip('/')}"


def _command(ctx: typer.Context) -> tuple[str, ...]:
    """The running command, rebuilt from what was given (defaults left out), to rerun it."""
    words = ["tgi", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if source is None or source.name == "DEFAULT":
            continue
        value = ctx.params.get(name)
        values = value if isinstance(value, list | tuple) else [value]
        if param.param_type_name == "argument":
            words.extend(str(v) for v in values)
        elif getattr(param, "is_flag", False):
            secondary = getattr(param, "secondary_opts", None) or param.opts
            words.append(param.opts[0] if value else secondary[0])
        else:
            for item in values:
                words += [param.opts[0], str(item.value if isinstance(item, Enum) else item)]
    return tuple(words)


def _show_serve(result: ServeResult) -> None:
    from tgi.bench.report import failures_table, latency_table, serve_table

    _console.print(latency_table(result))
    _console.print(serve_table(result))
    failures = failures_table(result)
    if failures is not None:
        _console.print(failures)


@bench_app.command("compare")
def compare(
    results: Annotated[list[Path], typer.Argument(help="Result JSON files of `bench serve`.")],
    baseline: Annotated[
        str | None, typer.Option(help="Label ratios are relative to; default the first.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the comparison PNG here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown table here.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the combined JSON here.")] = None,
    title: Annotated[str | None, typer.Option(help="The plot's title.")] = None,
) -> None:
    """Put several `bench serve` results side by side: one table, one plot.

    Files with the same label are one system's levels, run separately.
    """
    from tgi.bench.report import Comparison, comparison_markdown, comparison_rows, comparison_table

    try:
        loaded = [load_serve_result(path) for path in results]
        merged = merge_by_label(loaded)  # files of one label: levels of one system
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    labels = [r.label for r in merged]
    base = baseline or labels[0]
    if base not in labels:
        raise typer.BadParameter(f"--baseline {base!r} is none of {labels}")
    rows = comparison_rows(merged, base)
    _console.print(comparison_table(rows, base))
    for result in merged:
        failed = sum(level.metrics.failed for level in result.levels)
        if failed:
            _console.print(f"[red]{result.label}: {failed} failed requests[/red]")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(comparison_markdown(rows, base), encoding="utf-8")
        _console.print(f"markdown: {markdown}")
    if output is not None:
        # per-request timings stay in the files compared; the summary keeps the rest
        slim = tuple(_without_requests(result) for result in loaded)
        write_json(output, Comparison(now_iso(), base, tuple(rows), slim))
        _console.print(f"combined result: {output}")
    if plot is not None:
        from tgi.bench.plot import plot_serve

        with _bench_extra("compare --plot"):
            plot_serve(merged, plot, title)
        _console.print(f"plot: {plot}")


def _without_requests(result: ServeResult) -> ServeResult:
    levels = tuple(dataclasses.replace(level, requests=()) for level in result.levels)
    return dataclasses.replace(result, levels=levels)


@bench_app.command("engine")
def engine(
    ctx: typer.Context,
    model_id: Annotated[str | None, typer.Option(help="As `tgi serve --model-id`.")] = None,
    backend: Annotated[str | None, typer.Option(help="Backend plugin; default the best.")] = None,
    dtype: Annotated[str | None, typer.Option(help="As `tgi serve --dtype`.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,2,4,8.")] = "1,2,4,8",
    input_len: Annotated[int, typer.Option(help="Prompt tokens per row.")] = 128,
    decode_steps: Annotated[int, typer.Option(help="Decode steps after each prefill.")] = 32,
    runs: Annotated[int, typer.Option(help="Counted runs per batch size.")] = 3,
    warmup: Annotated[int, typer.Option(help="Uncounted runs per batch size.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for the random prompts.")] = 0,
    label: Annotated[str | None, typer.Option(help="Name in the result.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the result JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG here.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Time prefill and decode steps of a backend directly, for batch sizes 1..N."""
    _setup_logging(verbose)
    from tgi.bench.engine import EngineParameters, EngineResult, open_backend, run_engine
    from tgi.bench.report import engine_table
    from tgi.bench.results import Environment
    from tgi.errors import TgiError

    sizes = sorted(set(_ints(batch_sizes, "--batch-sizes")))
    if not sizes or sizes[0] < 1:
        raise typer.BadParameter("--batch-sizes must be positive integers")
    parameters = EngineParameters(tuple(sizes), input_len, decode_steps, runs, warmup, seed)
    environment = Environment.collect()
    try:
        with _console.status("loading and warming up the backend"):
            opened = open_backend(model_id, backend, dtype, parameters)
    except TgiError as exc:
        _console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    backend_impl, name, version, served_id, vocab_size = opened
    bar = _progress()
    tasks = {size: bar.add_task(f"batch {size}", total=warmup + runs) for size in sizes}
    try:
        with bar:
            levels = run_engine(
                backend_impl,
                parameters,
                vocab_size,
                on_run=lambda size, _run: bar.advance(tasks[size]),
            )
    finally:
        backend_impl.close()
    result = EngineResult(
        label=label or name,
        created=now_iso(),
        command=_command(ctx),
        environment=environment,
        backend=name,
        backend_version=version,
        model_id=served_id,
        parameters=parameters,
        levels=tuple(levels),
    )
    _console.print(engine_table(result))
    if output is not None:
        write_json(output, result)
        _console.print(f"result: {output}")
    if plot is not None:
        from tgi.bench.plot import plot_engine

        with _bench_extra("engine --plot"):
            plot_engine(
                [result.label],
                [[lv.batch_size for lv in levels]],
                [[lv.prefill_ms.p50 for lv in levels]],
                [[lv.decode_step_ms.p50 for lv in levels]],
                plot,
            )
        _console.print(f"plot: {plot}")


@bench_app.command("synthetic-server")
def synthetic_server(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8089,
    ttft_ms: Annotated[float, typer.Option(help="Delay before the first token.")] = 50.0,
    itl_ms: Annotated[float, typer.Option(help="Delay before each next token.")] = 10.0,
    faults: Annotated[
        str, typer.Option(help="Cycle of faults per request, e.g. none,none,http_429.")
    ] = "none",
) -> None:
    """Serve a fake model with known delays, to check what `bench serve` measures."""
    from tgi.bench.synthetic import SyntheticServer, SyntheticSpec, fault_cycle

    try:
        cycle = fault_cycle([f for f in faults.split(",") if f])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    spec = SyntheticSpec(ttft_s=ttft_ms / 1000.0, itl_s=itl_ms / 1000.0, faults=cycle)

    async def main() -> None:
        server = SyntheticServer(spec)
        bound = await server.start("127.0.0.1", port)
        _console.print(f"synthetic server on http://127.0.0.1:{bound} ({spec})")
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        _console.print("stopped")
