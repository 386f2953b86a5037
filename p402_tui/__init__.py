"""P402 Console: a terminal-native AI orchestration layer."""

__version__ = "0.1.0"
