"""Experiments on real data: built-in datasets, small models and training loops.

Everything here needs the ``bench`` extra (scikit-learn, mnist1d); nothing is
downloaded: digits ships with scikit-learn and mnist1d is generated
procedurally.
"""
