"""The torch-free hub: manifests, registries, the cache, downloads, archives and the read-only operations."""
