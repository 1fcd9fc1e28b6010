"""svcproxy's built-in plugins. Each module is one plugin, enabled by name."""
