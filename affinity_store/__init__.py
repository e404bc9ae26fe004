"""The shared (api key id, model) → provider binding store, behind one small Protocol."""
