"""The synthetic paediatric whole-body STIR phantom with CNO lesions."""
