"""Option parsing shared by the CLI commands."""

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
