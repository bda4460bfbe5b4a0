"""Image bytes: verification, decoding, resizing, the WebDataset tar writer and sample grids (pure functions)."""
