"""engine: LLM inference with a native compute core."""

__version__ = "0.1.0"
