"""Layer 1 (the bottom): user errors, progress and cancel, devices, free memory, fonts. Imports nothing of the engine
above it."""
