"""``python -m g4seg`` (what ``torchrun -m g4seg`` and ``accelerate launch -m g4seg`` start)."""

from g4seg.cli import main

if __name__ == "__main__":
    main()
