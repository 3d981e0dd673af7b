"""Device-neutral sampling: torch ops only, so it runs wherever the logits are."""

from tgi.sampling.batch import BatchSampler, PendingTokens, SampledTokens
from tgi.sampling.params import GrammarSpec, SamplingParams
from tgi.sampling.sampler import HistoryView, SampleOutput, SamplingBatch, sample
from tgi.sampling.watermark import WatermarkScore, detect_watermark

__all__ = [
    "BatchSampler",
    "GrammarSpec",
    "HistoryView",
    "PendingTokens",
    "SampleOutput",
    "SampledTokens",
    "SamplingBatch",
    "SamplingParams",
    "WatermarkScore",
    "detect_watermark",
    "sample",
]
