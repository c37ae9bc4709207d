"""COCO panoptic predictions: the format (:mod:`.format`), panoptic quality as panopticapi computes it
(:mod:`.quality`, ``g4seg eval --panoptic``) and the per-segment refinement of a prediction
(:mod:`.refine`, ``g4seg refine-panoptic``). See docs/panoptic.md."""
