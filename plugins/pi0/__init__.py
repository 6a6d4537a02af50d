"""Built-in pi0 model adapter (transformers-native PI0ForConditionalGeneration)."""

from toolkit.sdk.options import CliOption
from toolkit.sdk.hookspecs import hookimpl

__all__ = ["Pi0Adapter"]


def __getattr__(name: str):
    """``Pi0Adapter`` on first use: the adapter module imports torch and transformers, the plugin module does not."""
    if name == "Pi0Adapter":
        from toolkit_plugins.pi0.adapter import Pi0Adapter

        return Pi0Adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_models(register):
    register("toolkit_plugins.pi0.adapter:Pi0Adapter", name="pi0")


@hookimpl
def register_cli_options(register):
    register("extract", CliOption("--no-normalise", "normalise", "pi0: feed the raw state and store the actions in "
                                  "the policy's normalised units (the checkpoint's statistics are not applied)",
                                  target="model", is_flag=True, convert=lambda flag, store: False))
