"""--num-shard's settings and the shard plan: which slice each rank holds, and the
divisibility a model must meet, named before any weight loads."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tgi.config import resolve_config
from tgi.errors import ConfigError
from tgi.models.llama import LlamaSpec
from tgi.parallel.env import rank_environment
from tgi.parallel.sharding import check_shardable, plan_shard

SMOLLM2 = {  # SmolLM2-135M's shape
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def spec(**overrides: object) -> LlamaSpec:
    return LlamaSpec.from_hf({**SMOLLM2, **overrides})


def test_num_shard_comes_from_the_flag_tgis_variable_or_torchrun() -> None:
    assert resolve_config({}, {}).num_shard == 1
    config = resolve_config({}, {"NUM_SHARD": "2", "SHARDED": "true"})
    assert (config.num_shard, config.sharded, config.source_of("num_shard")) == (
        2,
        True,
        "env NUM_SHARD",
    )
    job = resolve_config({}, TORCHRUN)
    assert (job.num_shard, job.source_of("num_shard")) == (2, "env WORLD_SIZE")
    assert rank_environment(TORCHRUN) == rank_environment({**TORCHRUN, "LOCAL_RANK": "0"})


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        ({"sharded": "true"}, {}, r"--sharded true \(cli\) needs --num-shard N with N > 1"),
        ({"sharded": "false", "num_shard": 2}, {}, r"contradicts --num-shard 2 \(cli\)"),
        ({"num_shard": 0}, {}, r"--num-shard must be positive, got 0"),
        ({"num_shard": 4}, TORCHRUN, r"one of WORLD_SIZE=2 ranks \(torchrun\)"),
        ({}, {**TORCHRUN, "RANK": "2"}, r"RANK=2 is outside WORLD_SIZE=2"),
        ({}, {**TORCHRUN, "WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
    ],
)
def test_contradictory_shard_settings_are_refused(
    cli: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(cli, environ)


def test_smollm2_splits_over_three_but_not_two() -> None:
    check_shardable(spec(), 3)
    with pytest.raises(ConfigError) as raised:
        check_shardable(spec(), 2)
    assert str(raised.value) == (
        "LlamaForCausalLM does not split over --num-shard 2: 9 attention heads % 2 shards "
        "!= 0; 3 KV heads and 2 shards: one must divide the other (KV heads are split, or "
        "replicated when there are fewer than shards). Choose a shard count that divides them"
    )


def test_int4_slices_must_end_on_group_boundaries() -> None:
    check_shardable(spec(), 3, quantize="int4")  # 192 and 512 columns: groups of 32
    with pytest.raises(ConfigError, match="int4 groups of 32: each shard's MLP slice of 48"):
        check_shardable(spec(intermediate_size=144), 3, quantize="int4")


def test_heads_mlp_and_vocabulary_are_split_evenly_in_rank_order() -> None:
    plans = [plan_shard(spec(), rank, 3) for rank in range(3)]
    assert [p.heads for p in plans] == [(0, 3), (3, 6), (6, 9)]
    assert [p.kv_heads for p in plans] == [(0, 1), (1, 2), (2, 3)]
    assert [p.intermediate for p in plans] == [(0, 512), (512, 1024), (1024, 1536)]
    assert [p.vocab for p in plans] == [(0, 16384), (16384, 32768), (32768, 49152)]
    local = plans[1].local_spec(spec())
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (3, 1, 512)
    assert local.vocab_size == 49152 and local.hidden_size == 576


def test_fewer_kv_heads_than_shards_are_replicated_where_their_queries_are() -> None:
    # 8 query heads, 2 KV heads (groups of 4), 4 shards: ranks 0-1 read KV head 0
    plans = [plan_shard(spec(num_attention_heads=8, num_key_value_heads=2), r, 4) for r in range(4)]
    assert [p.heads for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_a_vocabulary_the_shards_do_not_divide_is_padded() -> None:
    plans = [plan_shard(replace(spec(), vocab_size=259), rank, 2) for rank in range(2)]
    assert [p.vocab for p in plans] == [(0, 130), (130, 260)]
    assert plans[1].vocab_size == 259


def test_a_rank_reads_only_its_slice_rows_past_the_end_are_zeros(tmp_path: object) -> None:
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from tgi.weights import DictTensors, SafetensorsCheckpoint, read_slice

    weight = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    assert isinstance(tmp_path, Path)
    save_file({"w": weight}, str(tmp_path / "model.safetensors"))
    for source in (SafetensorsCheckpoint(tmp_path), DictTensors({"w": weight})):
        assert torch.equal(read_slice(source, "w", 1, 2, 4), weight[:, 2:4])
        assert torch.equal(read_slice(source, "w", 0, 3, 6)[:2], weight[3:5])
        assert torch.equal(read_slice(source, "w", 0, 3, 6)[2], torch.zeros(4))
        assert torch.equal(read_slice(source, "w", 0, 6, 8), torch.zeros(2, 4))  # past the end
