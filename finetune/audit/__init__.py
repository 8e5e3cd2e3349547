"""Auditing a dataset before training on it: likely mislabeled images, near-duplicates and exact
copies within and across splits, and images unlike the rest of their class.

Everything works on one embedding per image, computed once by a pretrained backbone (``embed``):
a k-fold probe and confident learning rank the labels (``labels``) and cosine similarity finds the
outliers (``outliers``); the near-duplicates are told by small pixel thumbnails (``duplicates``),
which tell two views of one photo from two photos of one kind where the embedding cannot. ``findings.examine`` runs the three.
"""
