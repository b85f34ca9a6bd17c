"""The model store: the registry (models.yaml), safetensors headers, the cache and hub downloads."""
