"""Layer 5: segmenting one image: inputs to the working grid, sliding windows, lesions, figure, provenance."""
