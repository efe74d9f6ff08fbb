"""The HTTP side: one module per dialect (its wire models, its router, its shaping), the
runtime the routes reach, the settings, the error shape and the HTTP edge. Only the native
API's methods are in service.py, as BentoML API methods."""
