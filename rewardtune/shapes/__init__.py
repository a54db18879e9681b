"""The shapes world: procedural captioned images, an oracle with gold scores, and its tiny models."""
