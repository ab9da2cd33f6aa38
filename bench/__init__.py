"""diffusion-bench: fine-tune and evaluate text-to-image diffusion models reproducibly."""

__version__ = "0.1.0"
