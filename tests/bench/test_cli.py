"""`tgi bench serve` and `tgi bench compare` from the command line: JSON, table, PNG."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tgi.bench.results import SCHEMA, load_serve_result, merge_by_label, to_jsonable
from tgi.bench.synthetic import Fault, SyntheticSpec, serve_in_thread
from tgi.cli import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _serve(url: str, tokenizer: Path, output: Path, label: str, *extra: str) -> Any:
    args = [
        "bench",
        "serve",
        "--url",
        url,
        "--label",
        label,
        "--tokenizer",
        str(tokenizer),
        "--input-len",
        "12",
        "--output-len",
        "6",
        "--concurrency",
        "1,4",
        "--num-prompts",
        "4,8",
        "--warmup",
        "1",
        "--no-progress",
        "--output",
        str(output),
        *extra,
    ]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def two_results(
    tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path
) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("results")
    fast, flaky = folder / "fast.json", folder / "flaky.json"
    with serve_in_thread(SyntheticSpec(ttft_s=0.02, itl_s=0.004)) as (url, _):
        result = _serve(url, byte_tokenizer_dir, fast, "fast", "--goodput", "ttft:1000")
        assert result.exit_code == 0, result.output
    # flaky: every third request is refused; the warm-up takes the first of the cycle
    spec = SyntheticSpec(ttft_s=0.04, itl_s=0.008, faults=(Fault.HTTP_429, Fault.NONE, Fault.NONE))
    with serve_in_thread(spec) as (url, _):
        result = _serve(url, byte_tokenizer_dir, flaky, "flaky", "--api", "tgi")
        assert result.exit_code == 0, result.output
        assert "http_429" in result.output  # the failures table is shown
    return fast, flaky


def test_result_json_records_machine_command_parameters(two_results: tuple[Path, Path]) -> None:
    data = json.loads(two_results[0].read_text())
    assert data["schema"] == SCHEMA and data["label"] == "fast"
    command = data["command"]
    assert command[:5] == ["tgi", "bench", "serve", "--url", data["parameters"]["base_url"]]
    assert "--no-progress" in command and command[command.index("--input-len") + 1] == "12"
    environment = data["environment"]
    assert environment["cpu_count"] >= 1 and environment["memory_gib"] > 0
    assert environment["packages"]["tgi-server"]
    parameters = data["parameters"]
    assert (parameters["input_len"], parameters["output_len"], parameters["ignore_eos"]) == (
        12,
        6,
        True,
    )
    assert parameters["slo_ms"] == {"ttft": 1000.0}
    assert data["server_info"]["/info"]["model_id"] == "synthetic"
    levels = data["levels"]
    assert [(lv["max_concurrency"], lv["request_rate"]) for lv in levels] == [(1, None), (4, None)]
    assert [lv["metrics"]["completed"] for lv in levels] == [4, 8]
    assert all(lv["metrics"]["good_requests"] == lv["metrics"]["completed"] for lv in levels)
    assert len(levels[1]["requests"]) == 8
    assert levels[1]["requests"][0]["output_tokens"] == 6
    assert len(levels[1]["requests"][0]["itl_s"]) == 5


def test_result_json_round_trips(two_results: tuple[Path, Path]) -> None:
    for path in two_results:
        loaded = load_serve_result(path)
        assert to_jsonable(loaded) == json.loads(path.read_text())


def test_failures_are_in_the_result(two_results: tuple[Path, Path]) -> None:
    flaky = load_serve_result(two_results[1])
    for level in flaky.levels:
        m = level.metrics
        assert m.failed > 0 and m.completed + m.failed == m.num_requests
        assert [(f.kind, f.count) for f in m.failures] == [("http_429", m.failed)]
        assert sum(1 for r in level.requests if not r.success) == m.failed


def test_compare_writes_table_json_and_png(two_results: tuple[Path, Path], tmp_path: Path) -> None:
    plot, markdown, combined = tmp_path / "c.png", tmp_path / "c.md", tmp_path / "c.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "compare",
            *map(str, two_results),
            "--plot",
            str(plot),
            "--markdown",
            str(markdown),
            "--output",
            str(combined),
        ],
    )
    assert result.exit_code == 0, result.output
    png = plot.read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(plot) as image:
        image.verify()
        assert image.size[0] > 800 and image.size[1] > 600
    fast, flaky = (load_serve_result(p) for p in two_results)
    table = markdown.read_text().splitlines()
    assert table[0].startswith("| level | system |")
    rows = [line.split(" | ") for line in table[2:]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [
        ("c=1", "fast"),
        ("c=1", "flaky"),
        ("c=4", "fast"),
        ("c=4", "flaky"),
    ]
    # the table's throughput and ratio are the results' own numbers
    assert rows[0][5] == f"{fast.levels[0].metrics.output_throughput:.1f}"
    ratio = flaky.levels[1].metrics.output_throughput / fast.levels[1].metrics.output_throughput
    assert rows[3][6] == f"{ratio:.2f}x"
    data = json.loads(combined.read_text())
    assert data["baseline"] == "fast" and len(data["results"]) == 2
    assert data["rows"][3]["ratio"] == pytest.approx(ratio)


def test_compare_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text('{"schema": "something-else"}')
    result = CliRunner().invoke(app, ["bench", "compare", str(path)])
    assert result.exit_code != 0


def test_files_of_one_label_merge_into_one_series(two_results: tuple[Path, Path]) -> None:
    fast = load_serve_result(two_results[0])
    high, low = (dataclasses.replace(fast, levels=(level,)) for level in reversed(fast.levels))
    (merged,) = merge_by_label([high, low])
    assert [level.max_concurrency for level in merged.levels] == [1, 4]
    assert merged.levels == fast.levels
    with pytest.raises(ValueError, match="same level"):
        merge_by_label([high, high])
