"""LightningDataModules, imported as ``bigain.datamodules`` and registered under the entry-point
group ``bigain.datamodules``."""
