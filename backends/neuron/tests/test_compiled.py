"""Reading compiled shapes from exported models, and choosing among exported variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tgi_backend_neuron._compiled import (
    CompiledShape,
    Wanted,
    find_variants,
    read_compiled_shape,
    select_variant,
)

from tgi.errors import ConfigError


def config_dir(path: Path, config: dict[str, object]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_nxd_exports_are_read_from_neuron_config_json(tmp_path: Path) -> None:
    model = config_dir(tmp_path / "m", {"model_type": "llama"})
    neuron = {
        "batch_size": 4,
        "sequence_length": 2048,
        "tp_degree": 2,
        "torch_dtype": "bfloat16",
        "continuous_batching": True,
        "max_context_length": 1024,
    }
    (model / "neuron_config.json").write_text(json.dumps(neuron))
    shape = read_compiled_shape(model)
    assert shape == CompiledShape(
        batch_size=4,
        sequence_length=2048,
        num_cores=2,
        auto_cast_type="bfloat16",
        continuous_batching=True,
        max_context_length=1024,
        where=f"{model / 'neuron_config.json'}",
        path=model,
    )


def test_legacy_exports_keep_a_neuron_section_and_rebuild_the_cache(tmp_path: Path) -> None:
    neuron = {"batch_size": 2, "sequence_length": 512, "num_cores": 2, "auto_cast_type": "bf16"}
    model = config_dir(tmp_path / "m", {"model_type": "llama", "neuron": neuron})
    shape = read_compiled_shape(model)
    assert shape is not None
    assert (shape.batch_size, shape.sequence_length, shape.num_cores) == (2, 512, 2)
    assert shape.auto_cast_type == "bfloat16"
    assert shape.continuous_batching is False  # predates continuous batching
    assert shape.max_context_length == 512
    assert shape.where == f"the neuron section of {model / 'config.json'}"


def test_a_plain_checkpoint_has_no_compiled_shape(tmp_path: Path) -> None:
    assert read_compiled_shape(config_dir(tmp_path / "m", {"model_type": "llama"})) is None


@pytest.mark.parametrize(
    ("neuron", "message"),
    [
        ({"batch_size": "four", "sequence_length": 512}, "batch_size must be a positive integer"),
        ({"batch_size": 4}, "lacks batch_size or sequence_length"),
        ({"batch_size": 4, "sequence_length": 512, "auto_cast_type": "int3"}, "auto_cast_type"),
    ],
)
def test_a_broken_neuron_section_names_the_file_and_key(
    tmp_path: Path, neuron: dict[str, object], message: str
) -> None:
    model = config_dir(tmp_path / "m", {"neuron": neuron})
    with pytest.raises(ConfigError, match=message) as raised:
        read_compiled_shape(model)
    assert str(model / "config.json") in str(raised.value)


def variant(root: Path, name: str, batch_size: int, sequence_length: int) -> Path:
    neuron = {"batch_size": batch_size, "sequence_length": sequence_length}
    return config_dir(root / name, {"neuron": neuron})


@pytest.fixture
def variants(tmp_path: Path) -> list[CompiledShape]:
    root = config_dir(tmp_path / "model", {"model_type": "llama"})  # the plain checkpoint
    variant(root, "bs16-len1024", 16, 1024)
    variant(root, "bs4-len1024", 4, 1024)
    variant(root, "bs8-len1024", 8, 1024)
    variant(root, "bs4-len4096", 4, 4096)
    found = find_variants(root)
    assert [shape.path.name for shape in found if shape.path] == [
        "bs16-len1024",
        "bs4-len1024",
        "bs4-len4096",
        "bs8-len1024",
    ]
    return found


FLAGS = {"batch_size": "--max-batch-size", "sequence_length": "--max-total-tokens"}


def pick(variants: list[CompiledShape], **wanted: int) -> str:
    asked = {name: [Wanted(value, FLAGS[name], "cli")] for name, value in wanted.items()}
    chosen = select_variant(variants, asked)
    assert chosen.path is not None
    return chosen.path.name


def test_the_exact_batch_size_is_preferred_over_a_larger_one(
    variants: list[CompiledShape],
) -> None:
    assert pick(variants, batch_size=8) == "bs8-len1024"
    # Both batch-4 variants beat bs8/bs16; with no length asked, the longer one serves.
    assert pick(variants, batch_size=4) == "bs4-len4096"


def test_else_the_smallest_larger_batch_size_serves(variants: list[CompiledShape]) -> None:
    assert pick(variants, batch_size=5) == "bs8-len1024"


def test_the_sequence_length_must_fit_and_exact_wins(variants: list[CompiledShape]) -> None:
    assert pick(variants, batch_size=4, sequence_length=2048) == "bs4-len4096"
    assert pick(variants, batch_size=4, sequence_length=1024) == "bs4-len1024"


def test_with_nothing_asked_the_largest_shapes_serve(variants: list[CompiledShape]) -> None:
    assert pick(variants) == "bs16-len1024"


def test_when_no_variant_fits_each_one_says_why(variants: list[CompiledShape]) -> None:
    with pytest.raises(ConfigError) as raised:
        pick(variants, batch_size=32)
    message = str(raised.value)
    assert "no exported Neuron variant fits the settings" in message
    assert "batch_size 16 < --max-batch-size 32 (cli)" in message
    assert "bs4-len4096" in message and "export the model again" in message
