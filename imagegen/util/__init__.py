"""Small things every layer uses: the error table, where files live, the host's GPUs."""
