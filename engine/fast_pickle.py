"""pickled_by_fields: a frozen slots dataclass that crosses the engine's pipe every step pickles as its class
and a tuple of its fields.

NOTE: dataclasses gives a frozen slots class a Python-level __getstate__/__setstate__ that walks fields() for
every object, both ways: ~35 us a step's StepOutputs (four such objects) on each side of the pipe, on cores the
decode step needs. Rebuilt through __init__ instead, the same values come back (each field as pickled).
"""
from __future__ import annotations

import dataclasses
import operator


def pickled_by_fields(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    get = operator.attrgetter(*names)
    if len(names) == 1:
        cls.__reduce__ = lambda self: (cls, (get(self),))
    else:
        cls.__reduce__ = lambda self: (cls, get(self))
    return cls
