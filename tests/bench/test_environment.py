"""The machine a benchmark ran on, as its result files record it."""

from __future__ import annotations

from pathlib import Path

from tgi.bench.results import Environment, cpu_features, from_jsonable, to_jsonable


def test_cpu_features_lists_the_known_flags_in_a_fixed_order(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\n"
        "flags\t\t: fpu amx_int8 sse avx2 amx_bf16 avx512f avx512_bf16 avx512bw\n"
    )
    assert cpu_features(cpuinfo) == ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def test_cpu_features_is_empty_without_cpuinfo(tmp_path: Path) -> None:
    assert cpu_features(tmp_path / "absent") == ()


def test_environment_keeps_its_features_through_json() -> None:
    environment = Environment.collect()
    again = from_jsonable(Environment, to_jsonable(environment))
    assert again.cpu_features == environment.cpu_features
    for feature in environment.cpu_features:
        assert feature in environment.summary
