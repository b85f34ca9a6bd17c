"""What runs in the worker (container or local process): ComfyUI behind an authenticating proxy.

It imports neither the engine nor the model store."""
