"""SAKE data: schema, loader and checker, the SAKE-mini offline world, builder, DataModule."""

from datamodules.audio_io import AudioError, AudioResolver, load_audio
from datamodules.datamodule import SakeDataModule
from datamodules.examples import EditExample, LabelledPrompt, to_example
from datamodules.loader import SakeData, load_file, load_sequences
from datamodules.schema import EditInstance, Query, SchemaError, parse_options

__all__ = [
    "AudioError",
    "AudioResolver",
    "EditExample",
    "EditInstance",
    "LabelledPrompt",
    "Query",
    "SakeData",
    "SakeDataModule",
    "SchemaError",
    "load_audio",
    "load_file",
    "load_sequences",
    "parse_options",
    "to_example",
]
