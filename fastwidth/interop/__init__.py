"""fastwidth's models outside fastwidth: Hugging Face checkpoints and microsoft/mup base shapes."""
