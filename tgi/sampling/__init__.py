"""Device-neutral sampling: torch ops only, so it runs wherever the logits are."""

from tgi.sampling.params import SamplingParams
from tgi.sampling.sampler import SampleOutput, SamplingBatch, sample

__all__ = ["SampleOutput", "SamplingBatch", "SamplingParams", "sample"]
