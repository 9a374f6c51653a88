"""Pure tensor math of each adapter algorithm: delta weights and bypass paths.

No modules, hooks or key names live here; ``loraplug.specs`` holds the glue that knows them.
"""
