"""Layer 2: grids and the LR/HR geometry rule, image reading and staged writing, small file utilities."""
