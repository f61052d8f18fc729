"""wbmri base layer: the site vocabulary, the contract files, the networks, and the shipped model."""
