"""SA-UMamba (Liu et al., PLoS One 2025) as an nnU-Net v2 plugin."""

__version__ = "0.1.0"
