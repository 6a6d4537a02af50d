"""Built-in OpenVLA model adapters: the project's Prismatic implementation (openvla-7b checkpoints loaded natively,
other Prismatic variants through their remote code), and OpenVLA-OFT (``openvla-oft``)."""

from toolkit.sdk.hookspecs import hookimpl

__all__ = ["OpenVLAAdapter", "OpenVLAOFTAdapter"]


def __getattr__(name: str):
    """``OpenVLAAdapter`` / ``OpenVLAOFTAdapter`` on first use: the adapter modules import torch and
    transformers, the plugin module does not."""
    if name == "OpenVLAAdapter":
        from toolkit_plugins.openvla.adapter import OpenVLAAdapter

        return OpenVLAAdapter
    if name == "OpenVLAOFTAdapter":
        from toolkit_plugins.openvla.oft_adapter import OpenVLAOFTAdapter

        return OpenVLAOFTAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_models(register):
    register("toolkit_plugins.openvla.adapter:OpenVLAAdapter", name="openvla")
    register("toolkit_plugins.openvla.oft_adapter:OpenVLAOFTAdapter", name="openvla-oft")
