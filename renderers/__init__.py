"""The renderer side: rings, the renderer process, frame renderers and their backends."""
