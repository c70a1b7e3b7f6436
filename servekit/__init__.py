"""servekit: serve PyTorch models on GPUs with TorchServe."""

__version__ = "0.1.0"
