"""Built-in RoboVLMs model adapter (Kosmos-2 backbone + LSTM action head; act_head context vector)."""

from toolkit.sdk.hookspecs import hookimpl

__all__ = ["RoboVLMsAdapter"]


def __getattr__(name: str):
    """``RoboVLMsAdapter`` on first use: the adapter module imports torch and transformers, the plugin module does not."""
    if name == "RoboVLMsAdapter":
        from toolkit_plugins.robovlms.adapter import RoboVLMsAdapter

        return RoboVLMsAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_models(register):
    register("toolkit_plugins.robovlms.adapter:RoboVLMsAdapter", name="robovlms")
