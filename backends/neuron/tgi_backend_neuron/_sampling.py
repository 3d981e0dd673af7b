"""How a Neuron graph exported with on-device sampling chooses each row's next token.

optimum-neuron's sampler takes one `(top_k, top_p, temperature)` row per batch row
(`sampling_params` [n, 3]); top_k=1 is greedy. Its top-k is bounded by the export's
`max_topk` (256 by default), so "no top-k" samples from the `max_topk` most likely
tokens, and it draws from the device's own random generator: a request's seed cannot
be honoured, and validation refuses a seed the client sets (see `DEVICE_PARAMETERS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tgi.sampling.params import SamplingParams

__all__ = ["DEVICE_PARAMETERS", "GREEDY", "RowSampling", "row_sampling"]

# The SamplingParams fields the device sampler honours (validation refuses the rest).
DEVICE_PARAMETERS = frozenset({"do_sample", "temperature", "top_k", "top_p"})


@dataclass(frozen=True, slots=True)
class RowSampling:
    """One row of optimum-neuron's `sampling_params`."""

    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 1.0

    def as_row(self) -> tuple[float, float, float]:
        return (float(self.top_k), self.top_p, self.temperature)


GREEDY = RowSampling()


def row_sampling(params: SamplingParams, max_top_k: int) -> RowSampling:
    """`params` as the device's sampler takes them; greedy unless sampling is on."""
    if not params.do_sample:
        return GREEDY
    top_k = params.top_k if 0 < params.top_k <= max_top_k else max_top_k
    return RowSampling(top_k=top_k, top_p=params.top_p, temperature=params.temperature)
