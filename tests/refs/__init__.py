"""Reference (diffusers / transformers) models at tiny configs, for parity tests. One module per model.

Nothing here is imported by flux_core: these exist only to build the ground truth the tests compare against."""
