"""Named plug-ins (curvatures, solvers) and the options each one declares.

A plug-in is a class with a ``name`` and an ``Options`` dataclass; registering it is all it takes for
every entry point (functional API, callback, ``msif``, Hydra configs) to accept ``solver=<name>`` or
``curvature=<name>`` and its options. Option names form one namespace per kind, so a config may carry
the options of several solvers (e.g. ``tol`` for CG and ``lissa_depth`` for LiSSA) and each solver
takes its own; every value is checked by the plug-in that declares it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Generic, Iterator, List, Mapping, Tuple, TypeVar

from ..errors import MSIFError

T = TypeVar("T")


@dataclass(frozen=True)
class NoOptions:
    """A plug-in without options."""


class Registry(Generic[T]):
    """Plug-in classes of one kind by name, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, plugin: T) -> T:
        """Add (or replace) ``plugin`` under ``plugin.name``; usable as a class decorator."""
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"A {self.kind} plug-in needs a non-empty string attribute `name`.")
        self._items[name] = plugin
        return plugin

    def remove(self, name: str) -> None:
        """Unregister ``name`` (a plug-in registered for a while, e.g. by a test)."""
        del self._items[name]

    def names(self) -> Tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def get(self, name: Any) -> T:
        """The plug-in called ``name``, or an error listing the ones there are."""
        if name not in self._items:
            raise MSIFError(self.refusal(name))
        return self._items[name]

    def refusal(self, name: Any) -> str:
        return (f"Unknown {self.kind} {name!r}: {self.kind}={name!r} is not allowed; choose one of "
                f"{list(self._items)}.")

    def option_names(self) -> List[str]:
        """Every option name any registered plug-in declares."""
        return sorted({f.name for p in self for f in fields(p.Options)})

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse unknown option names, and let each plug-in that declares a given name check its value."""
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise MSIFError(f"Unknown {self.kind} option(s) {unknown}; the {self.kind} options are "
                            f"{self.option_names()}.")
        for plugin in self:
            self.options_of(plugin, options)

    @staticmethod
    def options_of(plugin: Any, options: Mapping[str, Any]) -> Any:
        """``plugin.Options`` built from the entries of ``options`` it declares (the rest are others')."""
        own = {f.name for f in fields(plugin.Options)}
        return plugin.Options(**{k: v for k, v in options.items() if k in own})


def is_number(value: Any) -> bool:
    """A real number, not a bool (``True`` is an ``int`` to Python, never a setting's value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refusal(name: str, value: Any, rule: str, meaning: str) -> MSIFError:
    kind = "" if is_number(value) else f" (a {type(value).__name__})"
    why = f" ({meaning})" if meaning else ""
    return MSIFError(f"{name} must be {rule}{why}, got {value!r}{kind}.")


def check_int(name: str, value: Any, *, minimum: int = 1, optional: bool = False, meaning: str = "") -> None:
    """``value`` is an ``int`` (not a bool, not a float) ≥ ``minimum``, or None when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise _refusal(name, value, rule + (" or None" if optional else ""), meaning)


def check_float(name: str, value: Any, *, minimum: float = 0.0, strict: bool = True, optional: bool = False,
                meaning: str = "") -> None:
    """``value`` is a finite number ``> minimum`` (``≥`` unless ``strict``), or None when ``optional``: an
    infinite tolerance, scale or damping would silently zero the result, so it is refused too."""
    if optional and value is None:
        return
    if not (is_number(value) and math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        rule = f"a finite number {'>' if strict else '≥'} {minimum:g}" + (" or None" if optional else "")
        raise _refusal(name, value, rule, meaning)


def positive_int(owner: Any, *names: str) -> None:
    """Each named option of ``owner`` is an integer ≥ 1 (else a message naming it)."""
    for name in names:
        check_int(name, getattr(owner, name))


def positive_number(owner: Any, *names: str, optional: bool = False) -> None:
    """Each named option of ``owner`` is a finite number > 0 (or None when ``optional``)."""
    for name in names:
        check_float(name, getattr(owner, name), optional=optional)
