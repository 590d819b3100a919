"""ggtalker: audio-driven 3D Gaussian talking heads (GGTalker method) as a command-line suite."""

__version__ = "0.1.0"
