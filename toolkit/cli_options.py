"""Option parsing shared by the CLI commands."""

from typing import Any

from toolkit.errors import ToolkitError


def key_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    """``--model-option``/``--dataset-option`` style KEY=VALUE pairs as a dict (dashes in keys become _)."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ToolkitError(f"{option} takes KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.replace("-", "_")] = v
    return out


def int_option(value: Any, owner: str, name: str, minimum: int = 0, required: bool = False) -> int | None:
    """An adapter option that must be an integer >= minimum; None (or "") means not given, unless required."""
    if (value is None or value == "") and not required:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ToolkitError(f"{owner} option {name}={value!r} is not an integer") from None
    if n < minimum:
        raise ToolkitError(f"{owner} option {name} must be at least {minimum}, got {n}")
    return n
