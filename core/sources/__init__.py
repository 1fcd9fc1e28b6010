"""Where cluster events come from: manifests.py (a directory), kubernetes.py (the API)."""
