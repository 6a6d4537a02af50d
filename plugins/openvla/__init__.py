"""Built-in OpenVLA model adapter (remote-code OpenVLA checkpoints, or the project's Prismatic stand-in)."""

from toolkit.hookspecs import hookimpl
from toolkit_plugins.openvla.adapter import OpenVLAAdapter

__all__ = ["OpenVLAAdapter"]


@hookimpl
def register_models(register):
    register(OpenVLAAdapter)
