"""The training loop, checkpoints, metrics, preemption.

`fastwidth.train` is both this package and the notebook entry point
`fastwidth.train(config_or_path, **overrides)` (fastwidth.api.train): once any module below is
imported, Python binds the package to the attribute `fastwidth.train`, so the package itself is
made callable (a ModuleType subclass, the documented way to customize a module's behaviour).
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, config="demo", **kwargs):
        from fastwidth.api import train
        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
