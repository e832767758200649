"""What a compressor does, made visible: merge maps, frequency retention, side-by-side samples.

* :mod:`bigain.analysis.probe` - one fixed denoiser forward, and the input/context of a layer
  captured in it;
* :mod:`bigain.analysis.merge_maps` - which tokens each method keeps, merges or prunes, and the
  effective key/value pooling kernel (drawn by :mod:`bigain.analysis.merge_map_figures`);
* :mod:`bigain.analysis.spectrum` - per band of spatial frequency, how much of the attention
  output's energy survives compression;
* :mod:`bigain.analysis.edge_survival` - the share of the highest-Laplacian (edge) tokens that
  survive merging or pruning, per method and timestep;
* :mod:`bigain.analysis.samples` - generated images of several runs in one labelled grid;
* :mod:`bigain.analysis.study` - classification runs pooled over noise seeds, with paired tests
  against the baseline and each method's reference (``bigain report --pool_seeds``).

``bigain visualize`` (:mod:`bigain.commands.visualize`) runs them from the command line.
"""

from bigain.analysis.edge_survival import edge_survival, survival_share, write_edge_survival
from bigain.analysis.merge_maps import TokenMap, merge_maps, token_map, write_merge_maps
from bigain.analysis.probe import (
    DEFAULT_METHODS,
    MethodSpec,
    Probe,
    capture_layer,
    list_layers,
    load_backbone,
    parse_methods,
    probe_backbone,
)
from bigain.analysis.samples import write_samples
from bigain.analysis.spectrum import (
    BAND_EDGES,
    BANDS,
    band_energies,
    band_errors,
    frequency_retention,
    spectrum_markdown,
    spectrum_table,
    write_spectrum,
)

__all__ = [
    "Probe", "MethodSpec", "DEFAULT_METHODS", "parse_methods", "probe_backbone", "load_backbone", "capture_layer",
    "list_layers", "TokenMap", "token_map", "merge_maps", "write_merge_maps", "BANDS", "BAND_EDGES",
    "band_energies", "band_errors", "frequency_retention", "spectrum_table", "spectrum_markdown", "write_spectrum",
    "write_samples", "edge_survival", "survival_share", "write_edge_survival",
]
