"""Built-in pi0 model adapter (transformers-native PI0ForConditionalGeneration)."""

from toolkit.hookspecs import hookimpl
from toolkit_plugins.pi0.adapter import Pi0Adapter

__all__ = ["Pi0Adapter"]


@hookimpl
def register_models(register):
    register(Pi0Adapter)
