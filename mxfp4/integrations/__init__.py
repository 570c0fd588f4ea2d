"""Adapters to the frameworks users already run. Each submodule imports its framework lazily, so
``import mxfp4`` never needs them: ``mxfp4.integrations.transformers`` needs ``transformers``."""
