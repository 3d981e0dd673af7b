"""The in-tree probes never initialise a device runtime: they run before ranks fork.

Each probe runs in a fresh interpreter (a CUDA context or a Neuron runtime, once made,
cannot be unmade, and would leak between tests) under a guard that records
- any call of `torch.cuda._lazy_init`, through which every CUDA initialisation goes
  (`torch.cuda.init()`, a tensor created on "cuda", `current_device()`, ...);
- any import of a device runtime package (`torch_neuronx`, `torch_xla`, `libneuronxla`,
  `neuronxcc`, `habana_frameworks`).
A canary probe that does initialise CUDA proves the guard sees it, even on a CPU-only
torch, where `torch.cuda.is_initialized()` alone could never turn true.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# entry-point name -> (the module that holds its hooks, where its source lives, environ)
IN_TREE = {
    "cpu": ("tgi_backend_cpu.plugin", ROOT / "backends" / "cpu", {}),
    "neuron": ("tgi_backend_neuron.plugin", ROOT / "backends" / "neuron", {}),
    "neuron-emulated": (
        "tgi_backend_neuron.plugin",
        ROOT / "backends" / "neuron",
        {"TGI_NEURON_EMULATE": "1"},
    ),
    "template": ("tgi_backend_template.plugin", ROOT / "plugins" / "template", {}),
}
CANARY = """
import torch
from tgi.backend.hookspecs import BackendProbe, hookimpl

TGI_CONTRACT_VERSION = 2


@hookimpl
def tgi_backend_probe():
    torch.cuda.init()  # what a probe must never do
    return BackendProbe("canary", "0", True, "", 0, "continuous")


@hookimpl
def tgi_validate_config(config):
    return None


@hookimpl
def tgi_backend_create(config, model):
    raise NotImplementedError
"""
# Runs in the child: guard, load one plugin through the real manager, report as JSON.
HARNESS = textwrap.dedent(
    """
    import importlib.abc, importlib.metadata, json, sys

    import torch

    module, name, environ = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    FORBIDDEN = {"torch_neuronx", "torch_xla", "libneuronxla", "neuronxcc", "habana_frameworks"}
    events = []

    def refuse_cuda_init(*args, **kwargs):
        events.append("torch.cuda._lazy_init")
        raise RuntimeError("a probe initialised CUDA")

    torch.cuda._lazy_init = refuse_cuda_init

    class Guard(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in FORBIDDEN:
                events.append("import " + fullname)
            return None  # only watch; the normal finders still decide

    sys.meta_path.insert(0, Guard())
    entry = importlib.metadata.EntryPoint(name=name, value=module, group="tgi.backends")
    importlib.metadata.entry_points = lambda *, group: [entry] if group == entry.group else []

    from tgi.backend.manager import BackendManager

    [record] = BackendManager.from_environ(environ).records
    print(json.dumps({
        "status": record.status.value,
        "reason": record.reason,
        "events": events,
        "cuda_initialized": torch.cuda.is_initialized(),
    }))
    """
)


def run_probe(module: str, name: str, paths: list[Path], environ: dict[str, str]) -> dict:
    """Load and probe one plugin in a fresh interpreter; what the guard saw, as a dict."""
    code = f"import sys; sys.path[:0] = {[str(p) for p in paths]!r}\n" + HARNESS
    done = subprocess.run(
        [sys.executable, "-c", code, module, name, json.dumps(environ)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("key", sorted(IN_TREE))
def test_in_tree_probe_initialises_no_device_runtime(key: str) -> None:
    module, source, environ = IN_TREE[key]
    name = key.removesuffix("-emulated")

    seen = run_probe(module, name, [ROOT, source], environ)

    assert seen["events"] == []
    assert seen["status"] in ("available", "unavailable"), seen["reason"]  # it was probed


def test_the_guard_catches_a_probe_that_initialises_cuda(tmp_path: Path) -> None:
    (tmp_path / "canary_plugin.py").write_text(CANARY)

    seen = run_probe("canary_plugin", "canary", [ROOT, tmp_path], {})

    assert seen["events"] == ["torch.cuda._lazy_init"]
    assert seen["status"] == "broken"
    assert "a probe initialised CUDA" in seen["reason"]
