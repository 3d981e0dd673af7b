"""The small ops of a decoder layer, as one object a device may replace with fused kernels.

NOTE: between its matmuls, a Llama layer runs a residual add and RMSNorm twice, rotary
on q and k, and SiLU-and-multiply. At decode batch sizes each is a few tens of KB of
work, so on a CPU their cost is torch's per-op overhead (RMSNorm alone is four ops in
bf16). `LayerOps` is their torch implementation, the reference; a `RunnerDevice` may set
`LlamaForCausalLM.ops` to a subclass whose methods are single compiled calls
(`tgi_backend_cpu._layer_ops`), and any tensor it does not handle it hands back here.

The residual add is fused with the norm that follows it: a layer returns its MLP output
unadded (`delta`), and the next layer's first norm (or the final norm) adds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tgi.models.rope import apply_rotary

if TYPE_CHECKING:
    from tgi.models.llama import RMSNorm

__all__ = ["TORCH_LAYER_OPS", "LayerOps"]


class LayerOps:
    """A layer's elementwise ops in plain torch; subclasses fuse them."""

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta, norm of it); with delta None, (hidden, norm(hidden))."""
        if delta is not None:
            hidden = hidden + delta
        return hidden, norm(hidden)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`apply_rotary(x, cos, sin)`; a subclass may rotate x in place and return it."""
        return apply_rotary(x, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up [N, 2 * size] = [gate | up]."""
        size = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :size]) * gate_up[:, size:]


TORCH_LAYER_OPS = LayerOps()
