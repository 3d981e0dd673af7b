"""Batching policies: which waiting requests join the batch at the next step."""

from tgi.router.policies.base import Admission, BatchingPolicy, Budget, Candidate
from tgi.router.policies.continuous import ContinuousPolicy
from tgi.router.policies.paged import PagedPolicy
from tgi.router.policies.static import SlotTable, StaticSlotsPolicy

__all__ = [
    "Admission",
    "BatchingPolicy",
    "Budget",
    "Candidate",
    "ContinuousPolicy",
    "PagedPolicy",
    "SlotTable",
    "StaticSlotsPolicy",
]
