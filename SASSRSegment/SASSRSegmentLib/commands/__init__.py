"""Layer 8, under the entry points: each command's arguments and run(), and how a command runs (runner)."""
