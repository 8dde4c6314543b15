"""Triton kernels, each with its plain-torch reference and torch.library op."""
