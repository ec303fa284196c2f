"""The operator's side: the Qt-free engine, the CLI and the Qt dashboard."""
