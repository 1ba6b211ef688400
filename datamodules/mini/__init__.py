"""SAKE-mini: the offline world (world.yaml), espeak-ng speech, procedural sounds, the build."""
