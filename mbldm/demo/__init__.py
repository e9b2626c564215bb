"""``mbldm demo``: the whole paper pipeline as one command, with an HTML report (see :mod:`mbldm.demo.pipeline`)."""
from __future__ import annotations

__all__ = ["DemoConfig", "run_demo"]


def __getattr__(name: str):
    if name in __all__:
        from mbldm.demo import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
