"""Built-in pi0 model adapter (transformers-native PI0ForConditionalGeneration)."""

from toolkit.sdk.options import CliOption
from toolkit.sdk.hookspecs import hookimpl
from toolkit_plugins.pi0.adapter import Pi0Adapter

__all__ = ["Pi0Adapter"]


@hookimpl
def register_models(register):
    register(Pi0Adapter)


@hookimpl
def register_cli_options(register):
    register("extract", CliOption("--no-normalise", "normalise", "pi0: feed the raw state and store the actions in "
                                  "the policy's normalised units (the checkpoint's statistics are not applied)",
                                  target="model", is_flag=True, convert=lambda flag, store: False))
