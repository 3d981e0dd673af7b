"""The shared backend conformance suite on the paged CPU engine (tiny llama, mistral and
qwen2), with block tables from the suite's own allocator; its `worker` variant runs the
paged engine in an engine worker, built by the plugin."""

from __future__ import annotations

from .conftest import PagedCpuSuite


class TestPagedCpuBackendConformance(PagedCpuSuite):
    pass
