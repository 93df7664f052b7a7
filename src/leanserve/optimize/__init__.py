"""Optimization: passes that make a model faster or smaller, and a search over them that chooses on a selection
part of the data and reports quality on a held-out part."""
