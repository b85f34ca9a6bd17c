"""imagegen: local image generation with ComfyUI workers."""

from pathlib import Path


def _version() -> str:
    """VERSION at the top of the checkout (or /app in the image) is the one source; an installed
    wheel has it in its metadata instead."""
    try:
        return (Path(__file__).resolve().parent.parent / "VERSION").read_text().strip()
    except OSError:
        from importlib.metadata import version

        return version("imagegen")


__version__ = _version()
# The one source of the pinned ComfyUI commit: the scripts and build-image.sh read this line.
COMFYUI_COMMIT = "f8b981ae9a5676311624bbafa636a1874db79459"
COMFYUI_VERSION = "0.3.75"  # the pinned ComfyUI's; a worker reports its own (/system_stats)
