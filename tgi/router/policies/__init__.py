"""Batching policies: which waiting requests join the batch at the next step."""

from tgi.router.policies.base import Admission, BatchingPolicy, Budget, Candidate
from tgi.router.policies.continuous import ContinuousPolicy

__all__ = ["Admission", "BatchingPolicy", "Budget", "Candidate", "ContinuousPolicy"]
