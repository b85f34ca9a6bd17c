"""Where workers run: one Runtime protocol; local processes, Docker containers and remote URLs as peers."""
