"""The K experts: system prompts, their MEF examples (gold solutions or teacher traces) and prompt rendering."""
