"""Experiments built on the study: the README's own-zoo example on BERTs (bert_example) and the geodesic
paper's diagonal linear networks (diagonal_networks), each runnable with ``python -m``."""
