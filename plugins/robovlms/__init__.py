"""Built-in RoboVLMs model adapter (Kosmos-2 backbone + LSTM action head; act_head context vector)."""

from toolkit.sdk.hookspecs import hookimpl
from toolkit_plugins.robovlms.adapter import RoboVLMsAdapter

__all__ = ["RoboVLMsAdapter"]


@hookimpl
def register_models(register):
    register(RoboVLMsAdapter)
