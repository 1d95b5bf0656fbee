"""Active learning: the unlabelled study the model is least sure about comes next."""

from __future__ import annotations

import logging
import random
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.engine.confidence import propagation_uncertainty
from lib.engine.segmenter import MedSAM2Segmenter

logger = logging.getLogger(__name__)


class PropagationUncertainty(Strategy):
    """Ranks unlabelled studies by SAM2's own uncertainty along a short propagation from a central box
    (:func:`lib.engine.confidence.propagation_uncertainty`: object-score entropy, mask-logit ambiguity and
    slice-to-slice mask instability). Scores are cached per (image, model version); at most ``max_candidates`` new
    studies are scored per request (a random sample), to bound latency. ``bench/active_learning_loop.py`` runs this
    class in a simulated annotation loop against random picking."""

    def __init__(self, segmenter: MedSAM2Segmenter, max_candidates: int = 8):
        super().__init__(
            "Highest model uncertainty along a propagation (SAM2 object score, mask ambiguity and stability)"
        )
        self.segmenter = segmenter
        self.max_candidates = max_candidates
        self._scores: dict[tuple[str, int], float] = {}

    def _score(self, image_path: str) -> float:
        provider = self.segmenter.provider
        model, version = provider.get()
        key = (image_path, version)
        if key not in self._scores:
            with self.segmenter.foreground():  # the background encoder waits meanwhile
                session = self.segmenter.open_image(image_path, axis=2, model=model)
                self._scores[key] = propagation_uncertainty(session.volume)
        return self._scores[key]

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        _, version = self.segmenter.provider.get()
        fresh = [i for i in images if (datastore.get_image_uri(i), version) not in self._scores]
        random.shuffle(fresh)
        budget = set(fresh[: self.max_candidates])
        ranked = []
        for image_id in images:
            uri = datastore.get_image_uri(image_id)
            if (uri, version) in self._scores or image_id in budget:
                try:
                    ranked.append((self._score(uri), image_id))
                except Exception as e:  # an unreadable study must not break the next-sample request
                    logger.warning("cannot score %s: %s", image_id, e)
        if not ranked:
            return {"id": random.choice(images)}
        score, image_id = max(ranked)
        return {"id": image_id, "uncertainty": round(score, 4), "scored": len(ranked)}
