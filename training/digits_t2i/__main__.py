"""python -m training.digits_t2i [--quick] [--out DIR]: train, save, evaluate (see the package docstring)."""

from training.digits_t2i.recipe import main

if __name__ == "__main__":
    main()
