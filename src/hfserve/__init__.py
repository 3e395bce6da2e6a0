"""hfserve: a model server for Hugging Face models (KServe v1/v2 and OpenAI APIs)."""

__version__ = "0.1.0"
