"""The stages a user runs, each collective: the run context, MEF SFT, RIEL (one step top to bottom), evaluation,
teacher traces and export."""
