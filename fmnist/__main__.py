"""``python -m fmnist`` runs the same command-line interface as the ``fmnist`` script."""

from fmnist.cli import main

if __name__ == "__main__":
    main()
