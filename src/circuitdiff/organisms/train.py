"""``python -m circuitdiff.organisms.train ARGS``: the same as ``circuitdiff organisms train ARGS``."""

if __name__ == "__main__":  # an entry point only (the recipe is in .recipe); never imported
    import sys

    from circuitdiff.cli import main

    sys.exit(main(["organisms", "train", *sys.argv[1:]]))
