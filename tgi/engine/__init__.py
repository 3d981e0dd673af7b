"""The engine: one backend and the sampler, driven one `StepPlan` at a time.

`EngineCore` (core.py) runs a plan: releases, one backend step, sampling, one host copy,
and returns a `StepResult` (results.py). The router drives an `Engine` (protocol.py):
`WorkerEngine` (worker/) runs the core in a worker process of its own, `LocalEngine`
(local.py) on the router's `EngineThread` (thread.py) in the HTTP process.
"""
