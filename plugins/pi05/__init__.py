"""Built-in pi0.5 model adapter (transformers-native PI05ForConditionalGeneration)."""

from toolkit.sdk.hookspecs import hookimpl

__all__ = ["Pi05Adapter"]


def __getattr__(name: str):
    """``Pi05Adapter`` on first use: the adapter module imports torch and transformers, the plugin module does not."""
    if name == "Pi05Adapter":
        from toolkit_plugins.pi05.adapter import Pi05Adapter

        return Pi05Adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_models(register):
    register("toolkit_plugins.pi05.adapter:Pi05Adapter", name="pi05")
