"""vaegen: VAEs trained on diffusion-model samples (DMaaPx) and their generalization gaps."""

__version__ = "0.1.0"
