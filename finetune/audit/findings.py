"""The three audits on one dataset's embeddings, and the rows of the files they are written to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.audit.duplicates import NEAR_RATIO, Pair, find_duplicates
from finetune.audit.embed import Embeddings
from finetune.audit.labels import LabelIssues, find_label_issues
from finetune.audit.outliers import Typicality, class_typicality

SUSPECT_COLUMNS = ("path", "split", "given", "suggested", "score", "p_given", "p_suggested")
DUPLICATE_COLUMNS = ("kind", "similarity", "path_a", "split_a", "label_a", "path_b", "split_b", "label_b")
OUTLIER_COLUMNS = ("path", "split", "label", "similarity", "z")


@dataclass
class Findings:
    """What the audit found in ``embeddings``: label issues, duplicate pairs, typicality."""

    embeddings: Embeddings
    labels: LabelIssues
    duplicates: list[Pair]
    typicality: Typicality

    def suspects(self) -> list[dict[str, object]]:
        """The likely mislabeled images, most suspicious first (``SUSPECT_COLUMNS``); ``score`` is the
        ranking's key, 1 - p_given / (the given label's threshold): highest first, below 0 for an
        image surer of its label than its class's images are on average."""
        emb, issues = self.embeddings, self.labels
        given = issues.given_probability(emb.labels)
        relative = issues.relative_confidence(emb.labels)
        rows = []
        for i in issues.order[issues.flagged[issues.order]]:
            suggested = int(issues.suggested[i])
            rows.append({"path": emb.paths[i], "split": emb.splits[i], "given": emb.classes[emb.labels[i]],
                         "suggested": emb.classes[suggested], "score": round(1 - float(relative[i]), 6),
                         "p_given": round(float(given[i]), 6),
                         "p_suggested": round(float(issues.probabilities[i, suggested]), 6)})
        return rows

    def duplicate_rows(self) -> list[dict[str, object]]:
        """Exact copies, then near-duplicates most alike first (``DUPLICATE_COLUMNS``)."""
        emb = self.embeddings
        return [{"kind": "exact" if p.exact else "near", "similarity": round(p.similarity, 6),
                 "path_a": emb.paths[p.first], "split_a": emb.splits[p.first],
                 "label_a": emb.classes[emb.labels[p.first]], "path_b": emb.paths[p.second],
                 "split_b": emb.splits[p.second], "label_b": emb.classes[emb.labels[p.second]]}
                for p in self.duplicates]

    def outliers(self) -> list[dict[str, object]]:
        """Images unlike the rest of their class, least typical first (``OUTLIER_COLUMNS``)."""
        emb, typ = self.embeddings, self.typicality
        found = np.flatnonzero(typ.outlier)
        return [{"path": emb.paths[i], "split": emb.splits[i], "label": emb.classes[emb.labels[i]],
                 "similarity": round(float(typ.similarity[i]), 6), "z": round(float(typ.z[i]), 3)}
                for i in found[np.argsort(typ.z[found], kind="stable")]]


def examine(embeddings: Embeddings, *, folds: int = 5, seed: int = 0,
            near_ratio: float = NEAR_RATIO) -> Findings:
    """Run the three audits.

    Args:
        embeddings: every image's embedding, given label, file and split.
        folds: folds of the label probes.
        seed: which images share a fold.
        near_ratio: the ratio test's bound for near-duplicates (``duplicates.near_duplicates``).
    """
    emb = embeddings
    issues = find_label_issues(emb.features, emb.labels, len(emb.classes), folds=folds, seed=seed)
    return Findings(emb, issues, find_duplicates(emb.paths, near_ratio),
                    class_typicality(emb.features, emb.labels))
