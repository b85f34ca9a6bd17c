#!/usr/bin/env python3
"""Container entrypoint: `serve` (ComfyUI behind the token proxy), `health`, `fetch MODEL`."""
import sys

from imagegen.entry import main

if __name__ == "__main__":
    sys.exit(main())
