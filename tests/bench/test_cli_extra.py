"""`tgi bench` without the bench extra says which extra to install (issue 17)."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from tgi.cli import app

# the modules `bench serve` imports that reach httpx, the bench extra's HTTP client
_BENCH_CLIENT_MODULES = ("tgi.bench.serve", "tgi.bench.client", "tgi.bench.loadgen")


def test_bench_serve_without_httpx_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` now fails
    for name in _BENCH_CLIENT_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    result = CliRunner().invoke(app, ["bench", "serve", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert not isinstance(result.exception, ModuleNotFoundError)
    assert (
        "error: `tgi bench serve` needs the bench extra (httpx is not installed): "
        "pip install 'tgi-server[bench]'"
    ) in result.output


def test_bench_serve_plot_without_matplotlib_fails_before_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(
        app, ["bench", "serve", "--url", "http://127.0.0.1:9", "--plot", "out.png"]
    )
    assert result.exit_code == 1
    assert "(matplotlib is not installed): pip install 'tgi-server[bench]'" in result.output


def test_a_missing_module_of_another_kind_is_not_blamed_on_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    monkeypatch.delitem(sys.modules, "tgi.bench.dataset", raising=False)
    monkeypatch.delitem(sys.modules, "tgi.bench.serve", raising=False)
    result = CliRunner().invoke(app, ["bench", "serve", "--url", "http://127.0.0.1:9"])
    assert isinstance(result.exception, ModuleNotFoundError)
    assert "tgi-server[bench]" not in result.output
