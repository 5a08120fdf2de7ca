"""The offline toy world: procedural scenes, a tiny dual encoder trained on their captions, and
the demo that shows retrieval helping where CLIP-style scoring meets masked segments."""
