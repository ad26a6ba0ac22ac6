"""``avatar-server serve``: the HTTP dispatcher that starts one session process per room.

Modules: :mod:`.config` (flags, TOML, environment), :mod:`.auth` (who may join,
who may administer), :mod:`.sessions` (slots and session processes),
:mod:`.renderer_host` (the renderer side as the dispatcher sees it),
:mod:`.metrics` (Prometheus), :mod:`.messages` (the control channel to a
session process) and :mod:`.app` (the aiohttp routes and ``serve_main``).
"""
