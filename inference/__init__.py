"""Inference layer: a NIfTI in; lesions, sites, measurements and a report out. Builds on ``models``."""
