"""Layer 1 (the bottom): user errors, progress and cancel, devices, fonts. Imports nothing of the engine
above it."""
