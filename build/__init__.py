"""Offline builds: packaged weights -> artifacts in model_repository/ (run as ``python -m build.<step>``)."""
