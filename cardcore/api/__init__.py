"""HTTP entrypoints: the aiohttp application, its middlewares and operator routes."""
