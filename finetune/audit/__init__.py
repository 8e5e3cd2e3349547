"""Auditing a dataset before training on it: likely mislabeled images, near-duplicates and exact
copies within and across splits, and images unlike the rest of their class.

Everything works on one embedding per image, computed once by a pretrained backbone (``embed``):
a k-fold probe and confident learning rank the labels (``labels``), cosine similarity finds the
duplicates (``duplicates``) and the outliers (``outliers``). ``findings.examine`` runs the three.
"""
