"""Training, data and evaluation for the bundled models (the `train` extra); nothing in the serving packages
imports it. Recipes: `python -m training.NAME [--quick]`; their quality numbers come from the served samplers."""
