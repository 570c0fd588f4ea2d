"""The one unwrap of a cuda-bindings result, shared by NVRTC (``codegen.build.compiler``) and the driver
(``codegen.runtime.launch``): every call returns ``(status, *values)`` and the caller wants the values or an
exception that says what failed."""

from __future__ import annotations

from typing import Any, Callable


def as_text(value: Any) -> str:
    """A ``bytes`` message from cuda-bindings as ``str`` (anything else through ``str``)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def unwrap(result: Any, success: Any, error: Callable[[Any], BaseException]) -> Any:
    """The values of ``result`` (``(status, *values)``, or a bare status): None when there are none,
    the value when there is one, else the tuple. A status other than ``success`` raises ``error(status)``."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if status != success:
        raise error(status)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
