"""bigain: training-free token compression for diffusion models that generate *and* classify.

Public API::

    import bigain
    bigain.list_compressors()                         # names, without importing plugin code
    comp = bigain.create_compressor("bigain_tm", ratio=0.7)
    with bigain.apply(pipe, comp) as handle:          # UNet2DConditionModel, DiTTransformer2DModel, pipelines
        image = pipe(prompt).images[0]
        print(handle.stats())                         # measured tokens in/out per layer
"""

from bigain.adapters import DenoiserAdapter, find_adapter, register_adapter
from bigain.compressor import Compressed, LayerContext, TokenCompressor, derive_seed
from bigain.errors import (
    BigainError,
    CheckpointError,
    CompressorError,
    ConfigError,
    DatasetError,
    PluginConflictError,
    PluginLoadError,
    RunFolderError,
    UnknownNameError,
    UnsupportedModelError,
)
from bigain.patching import CompressionHandle, apply, default_dit_blocks, find_denoiser
from bigain.registry import (
    PluginInfo,
    create_compressor,
    get_compressor,
    list_compressors,
    plugin_report,
    register_compressor,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "TokenCompressor",
    "Compressed",
    "LayerContext",
    "derive_seed",
    "apply",
    "CompressionHandle",
    "default_dit_blocks",
    "find_denoiser",
    "find_adapter",
    "DenoiserAdapter",
    "register_adapter",
    "list_compressors",
    "create_compressor",
    "get_compressor",
    "register_compressor",
    "plugin_report",
    "PluginInfo",
    "BigainError",
    "ConfigError",
    "UnknownNameError",
    "PluginLoadError",
    "PluginConflictError",
    "UnsupportedModelError",
    "CheckpointError",
    "CompressorError",
    "DatasetError",
    "RunFolderError",
]
