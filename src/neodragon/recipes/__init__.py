"""Recipes: one entry point per training or compression recipe, each built on the library (``neodragon.training``
and the models). Recipes are leaves: only the command line imports them."""
