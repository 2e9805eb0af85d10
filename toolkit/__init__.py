"""lmkit: one CLI from a folder of text (or music) to a trained, evaluated, exported, chattable model."""

__version__ = "0.1.0"
