"""The engine: one backend and the sampler, driven one `StepPlan` at a time.

`EngineCore` (core.py) runs a plan: releases, one backend step, sampling, one host copy,
and returns a `StepResult` (results.py). `EngineThread` (thread.py) is the one thread it
runs on inside the server process.
"""
