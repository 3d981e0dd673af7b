"""`tgi backends` output: the plain table and the JSON list, from hand-made records."""

from __future__ import annotations

import json

from tgi.backend.hookspecs import BackendFlag, BackendOptions, BackendProbe
from tgi.backend.listing import backends_json, backends_table
from tgi.backend.manager import PluginRecord, PluginStatus

CPU = PluginRecord(
    name="cpu",
    value="tgi_backend_cpu.plugin",
    distribution="tgi-backend-cpu",
    distribution_version="0.1.0",
    status=PluginStatus.AVAILABLE,
    probe=BackendProbe(
        name="cpu",
        version="0.1.0",
        available=True,
        reason="16 cores",
        priority=0,
        batching="continuous",
    ),
    reason="16 cores",
    options=BackendOptions(
        quantize=frozenset({"int8", "int4"}),
        kv_cache_dtypes=frozenset({"float32"}),
        flags=(BackendFlag("engine", "paged or generic"),),
    ),
)
NEURON = PluginRecord(
    name="neuron",
    value="tgi_backend_neuron.plugin",
    distribution="tgi-backend-neuron",
    distribution_version="0.3.0",
    status=PluginStatus.BROKEN,
    reason="import failed: ModuleNotFoundError:\n  No module named 'torch_neuronx'",
)
GAUDI = PluginRecord(
    name="gaudi",
    value="tgi_backend_gaudi.plugin",
    distribution=None,
    distribution_version=None,
    status=PluginStatus.DISABLED,
    reason="not in TGI_BACKENDS='cpu'",
)
EMULATED = PluginRecord(
    name="sim",
    value="sim.plugin",
    distribution="tgi-backend-sim",
    distribution_version="2.0",
    status=PluginStatus.UNAVAILABLE,
    probe=BackendProbe(
        name="sim",
        version="2.0.1",
        available=False,
        reason="no simulator",
        priority=5,
        batching="static",
        emulated=True,
    ),
    reason="no simulator",
)


def test_table_has_one_aligned_line_per_plugin() -> None:
    table = backends_table([CPU, NEURON, GAUDI, EMULATED])

    assert table.splitlines() == [
        "NAME    VERSION  DISTRIBUTION              AVAILABLE      BATCHING    REASON",
        "cpu     0.1.0    tgi-backend-cpu           yes            continuous  16 cores",
        "neuron  0.3.0    tgi-backend-neuron        broken         -           import failed: "
        "ModuleNotFoundError: No module named 'torch_neuronx'",
        "gaudi   -        tgi_backend_gaudi.plugin  disabled       -           "
        "not in TGI_BACKENDS='cpu'",
        "sim     2.0.1    tgi-backend-sim           no (emulated)  static      no simulator",
    ]


def test_table_without_plugins_says_where_they_come_from() -> None:
    assert backends_table([]) == "no backend plugins installed (entry-point group 'tgi.backends')"


def test_json_is_a_list_of_objects() -> None:
    parsed = json.loads(backends_json([CPU, NEURON]))

    assert parsed == [
        {
            "name": "cpu",
            "version": "0.1.0",
            "distribution": "tgi-backend-cpu",
            "distribution_version": "0.1.0",
            "module": "tgi_backend_cpu.plugin",
            "status": "available",
            "available": True,
            "reason": "16 cores",
            "priority": 0,
            "batching": "continuous",
            "emulated": False,
            "options": {
                "quantize": ["int4", "int8"],
                "dtypes": ["bfloat16", "float16", "float32"],
                "kv_cache_dtypes": ["float32"],
                "parallelism": "none",
                "flags": [
                    {"name": "engine", "help": "paged or generic", "type": "str", "env": None}
                ],
            },
        },
        {
            "name": "neuron",
            "version": "0.3.0",
            "distribution": "tgi-backend-neuron",
            "distribution_version": "0.3.0",
            "module": "tgi_backend_neuron.plugin",
            "status": "broken",
            "available": False,
            "reason": "import failed: ModuleNotFoundError:\n  No module named 'torch_neuronx'",
            "priority": None,
            "batching": None,
            "emulated": None,
            "options": None,
        },
    ]
