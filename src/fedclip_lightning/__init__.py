"""FedCLIP on PyTorch Lightning Fabric."""

__version__ = "0.1.0"
