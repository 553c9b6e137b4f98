"""Registries: names to algorithms, tasks and reward functions.

A name resolves, in this order, to
1. an entry registered in this process (``ALGORITHMS.register("rloo", spec)``: the core's own
   algorithms register in ``rlhf/algorithms/__init__.py``);
2. an installed entry point of the registry's group (``rlhf.algorithms``, ``rlhf.tasks``,
   ``rlhf.rewards``): the built-in tasks are declared so in ``pyproject.toml``, and a package of
   yours can declare its own the same way;
3. an import path ``package.module:attribute`` (the current folder is importable), so a task,
   reward or algorithm of yours works from YAML alone.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Any, Callable, Generic, TypeVar

from rlhf.errors import UserError

T = TypeVar("T")


def load_object(path: str, what: str) -> Any:
    """``package.module:attribute`` (dots after the colon walk attributes) -> the object."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise UserError(f"{what} {path!r}: expected a registered name or an import path 'package.module:attribute'")
    if module.startswith("."):  # importlib would raise TypeError: a relative import needs a package
        raise UserError(f"{what} {path!r}: {module!r} is a relative module path; write it in full from the current folder, e.g. 'my_package.module:attribute'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` would: your own modules beside the config
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{what} {path!r}: cannot import {module!r} ({e}); check the module path and that it is importable from "
                        "the current folder or installed") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} {path!r}: module {module!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Names -> entries of one kind (``what``), with ``group`` as its entry-point group."""

    def __init__(self, what: str, group: str, check: Callable[[Any, str], T] | None = None):
        self.what, self.group = what, group
        self._entries: dict[str, T] = {}
        self._check = check or (lambda obj, name: obj)

    def register(self, name: str, entry: Any) -> Any:
        """Add ``entry`` under ``name`` (returns it, so it can decorate a class)."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = self._check(entry, name)
        return entry

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted({*self._entries, *self._entry_points()})

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        eps = self._entry_points()
        if name in eps:
            try:
                obj = eps[name].load()
            except ImportError as e:
                raise UserError(f"{self.what} {name!r}: its entry point {eps[name].value!r} does not import ({e})") from None
            return self.register(name, obj) and self._entries[name]
        if ":" in name:
            return self._check(load_object(name, self.what), name)
        raise UserError(f"unknown {self.what} {name!r}; use one of {', '.join(self.names())}, or an import path 'package.module:attribute'")

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._entry_points()


def _is_task(obj: Any, name: str) -> Any:
    """A task is a class with a ``Config`` (a TaskConfig subclass) and ``build`` (rlhf.interfaces.TaskFactory)."""
    from rlhf.config import TaskConfig

    cfg = getattr(obj, "Config", None)
    if not (isinstance(obj, type) and isinstance(cfg, type) and issubclass(cfg, TaskConfig) and callable(getattr(obj, "build", None))):
        shown = f"{type(obj).__name__} {obj.__name__}" if hasattr(obj, "__name__") else f"a {type(obj).__name__}"
        raise UserError(f"task {name!r} is {shown}, not a task class; task.name must name a class "
                        "with a Config (a TaskConfig subclass) and a build classmethod (rlhf.interfaces.TaskFactory), e.g. counterpoint")
    return obj


TASKS: Registry = Registry("task", "rlhf.tasks", _is_task)
"""Task name -> class (a :class:`~rlhf.interfaces.TaskFactory`); the built-ins are entry points."""

REWARDS: Registry = Registry("reward", "rlhf.rewards")
"""Reward name -> callable or factory (:class:`~rlhf.interfaces.RewardFn`); ``rewards:`` of a run config."""
