"""The SDK: everything a plugin imports from the toolkit (and all it may import; checked by the import contracts).

    from toolkit.sdk import hookimpl, ModelAdapter, DatasetAdapter, Episode, Step, ToolkitError

* ``hookimpl`` and the hook specs (``toolkit.sdk.hookspecs``): ``register_models``, ``register_datasets``,
  ``register_targets``, ``register_cli_options``, ``register_commands``;
* the adapter contracts (``toolkit.sdk.adapters``): ``ModelAdapter``, ``DatasetAdapter``, ``Episode``, ``Step``,
  ``Expert``, ``SiteInfo``, ``ModelInputs``, ``PolicyOutput``, ``ActivationLayout``, the stream vocabulary
  ``DECODER_STREAMS``;
* typed options (``toolkit.sdk.options``): ``AdapterOptions``, ``CliOption``;
* the probe-target contract (``toolkit.sdk.targets``): ``Labels``, ``TargetData``;
* the selection grammar and hook names (``toolkit.sdk.names``): ``IndexSpec``, ``hook_name``;
* ``ToolkitError``: the one exception whose message the CLI prints as one line (exit code 2).

Helpers for model plugins live beside them: ``toolkit.sdk.checkpoint`` (exact checkpoint loading),
``toolkit.sdk.hf`` (Hugging Face loading), ``toolkit.sdk.safe_pickle`` (reading untrusted pickles),
``toolkit.sdk.fields`` (per-sample field types).  The conformance suite is ``toolkit.testing``.
Names load on first use.
"""

import importlib

_API = {
    "hookimpl": "toolkit.sdk.hookspecs",
    "ToolkitError": "toolkit.sdk.errors",
    **{name: "toolkit.sdk.adapters" for name in ("ModelAdapter", "DatasetAdapter", "Episode", "Step", "Expert",
                                                 "SiteInfo", "ModelInputs", "PolicyOutput", "ActivationLayout",
                                                 "DECODER_STREAMS")},
    "AdapterOptions": "toolkit.sdk.options",
    "CliOption": "toolkit.sdk.options",
    "Labels": "toolkit.sdk.targets",
    "TargetData": "toolkit.sdk.targets",
    "IndexSpec": "toolkit.sdk.names",
    "hook_name": "toolkit.sdk.names",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'toolkit.sdk' has no attribute {name!r}")
