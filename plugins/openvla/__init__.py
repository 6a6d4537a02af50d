"""Built-in OpenVLA model adapter: the project's Prismatic implementation (openvla-7b checkpoints loaded natively,
other Prismatic variants through their remote code)."""

from toolkit.sdk.hookspecs import hookimpl

__all__ = ["OpenVLAAdapter"]


def __getattr__(name: str):
    """``OpenVLAAdapter`` on first use: the adapter module imports torch and transformers, the plugin module does not."""
    if name == "OpenVLAAdapter":
        from toolkit_plugins.openvla.adapter import OpenVLAAdapter

        return OpenVLAAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_models(register):
    register("toolkit_plugins.openvla.adapter:OpenVLAAdapter", name="openvla")
