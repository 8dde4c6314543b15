"""cdcompile: a torch.compile backend for diffusion transformers."""
