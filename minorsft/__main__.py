"""`python -m minorsft` (and `torchrun -m minorsft`)."""

from minorsft.cli import main

if __name__ == "__main__":
    main()
