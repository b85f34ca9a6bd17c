"""imagegen: local image generation with ComfyUI workers."""

__version__ = "0.3.0"
COMFYUI_COMMIT = "f8b981ae9a5676311624bbafa636a1874db79459"
COMFYUI_VERSION = "0.3.75"
