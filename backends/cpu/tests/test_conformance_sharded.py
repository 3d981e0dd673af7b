"""The conformance suite's `worker` variant through the sharded executor: the paged CPU
engine split over two ranks (two worker processes, gloo), built by the plugin from the
`StartWorker` that `tgi serve --num-shard 2` sends. Only that variant runs here: the
direct and wire variants of one shard run in test_conformance_paged.py. The factory's
backend is one shard: the worker must declare the same capabilities."""

from __future__ import annotations

import pytest

from tgi.engine.worker.messages import StartWorker

from .conftest import PagedCpuSuite

pytestmark = pytest.mark.once  # see pyproject.toml

NUM_SHARD = 2


class TestShardedPagedCpuConformance(PagedCpuSuite):
    worker_settings = {"num_shard": NUM_SHARD, "cpu_threads": 1}

    @pytest.fixture(params=["worker"])
    def variant(self, request: pytest.FixtureRequest, architecture: str) -> str:
        if not self.runs_worker(architecture):
            pytest.skip("the sharded worker runs on the first tiny preset only")
        return str(request.param)

    def test_the_worker_is_split_over_the_ranks(self, worker_start: StartWorker) -> None:
        assert worker_start.world_size == NUM_SHARD
