"""Code of the ldm3d_downsample_factors bundle; configs reach it as ``scripts.<module>.<name>``."""

from . import checkpoints, data, diffusion, engines, inference, losses, networks, reporting, tracking
