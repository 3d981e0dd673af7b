"""Scheduling policies: what each step runs, and where its sequences live in the backend."""

from tgi.router.policies.base import (
    Admission,
    Budget,
    Candidate,
    PolicyLimits,
    Schedule,
    SchedulingPolicy,
)
from tgi.router.policies.continuous import ContinuousPolicy
from tgi.router.policies.paged import PagedPolicy
from tgi.router.policies.static import SlotTable, StaticSlotsPolicy

__all__ = [
    "Admission",
    "Budget",
    "Candidate",
    "ContinuousPolicy",
    "PagedPolicy",
    "PolicyLimits",
    "Schedule",
    "SchedulingPolicy",
    "SlotTable",
    "StaticSlotsPolicy",
]
