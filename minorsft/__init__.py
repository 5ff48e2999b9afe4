"""minorsft: fine-tune chat LLMs with the MinorSFT loss (arXiv 2408.10642)."""

__version__ = "0.9.3"
