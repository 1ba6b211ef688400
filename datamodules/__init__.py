"""SAKE data: schema, loader and checker, the SAKE-mini offline world, builder, DataModule.

Names are imported on first use (PEP 562), so that light users such as the SAKE-mini synthesis
workers do not import torch and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "AudioError": "datamodules.audio_io",
    "AudioResolver": "datamodules.audio_io",
    "load_audio": "datamodules.audio_io",
    "SakeDataModule": "datamodules.datamodule",
    "EditExample": "datamodules.examples",
    "LabelledPrompt": "datamodules.examples",
    "to_example": "datamodules.examples",
    "SakeData": "datamodules.loader",
    "load_file": "datamodules.loader",
    "load_sequences": "datamodules.loader",
    "EditInstance": "datamodules.schema",
    "Query": "datamodules.schema",
    "SchemaError": "datamodules.schema",
    "parse_options": "datamodules.options",
    "resolve_answer": "datamodules.options",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
