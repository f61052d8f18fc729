"""Service layer: the HTTP API, the job store, the web page, the client and the ``wbmri`` command line."""
