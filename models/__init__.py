"""wbmri base layer: the site vocabulary, the contract files, the networks, and the shipped model."""

# The software version (the package's, read by pyproject.toml). Reports name it (``model.software``), and a batch
# run redoes results made by another version: raise it whenever lesions, sites or measurements could change.
__version__ = "0.2.18"
SOFTWARE = f"wbmri {__version__}"
