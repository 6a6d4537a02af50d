"""Built-in OpenVLA model adapter: the project's Prismatic implementation (openvla-7b checkpoints loaded natively,
other Prismatic variants through their remote code)."""

from toolkit.sdk.hookspecs import hookimpl
from toolkit_plugins.openvla.adapter import OpenVLAAdapter

__all__ = ["OpenVLAAdapter"]


@hookimpl
def register_models(register):
    register(OpenVLAAdapter)
