"""Optimization: passes that make a model faster or smaller, measured on the same data, and a search over them."""
