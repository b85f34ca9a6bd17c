#!/usr/bin/env python3
"""Host-side CLI: `python generate_image.py "a friendly robot"` (same as the `imagegen` command)."""
import sys

from imagegen.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
