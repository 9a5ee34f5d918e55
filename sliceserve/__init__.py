"""sliceserve: SliceGPT slicing of language models, and a runtime that serves them."""

__version__ = "0.1.0"
