"""The one training loop shared by every model family."""
