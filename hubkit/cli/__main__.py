"""``python -m hubkit.cli``: the ``hub`` command without the console script."""
from . import main

main()
