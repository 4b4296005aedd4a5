"""Raw data sets: where they come from, how they are checked, read and turned into
implicit feedback (real sets) or semi-synthetic sets with known exposure."""
