"""The trainer: the loop that drives the engine, the Monitor and the checkpointer over a sweep.

Its entry is `fastwidth.train(config, **overrides)` (fastwidth.api.train), which trains and then
writes the report; `fastwidth.trainer.loop.run` trains only.
"""
