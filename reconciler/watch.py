"""Events on the config's directory (watchdog's thread): in-place writes, rename-over saves,
sed -i and Kubernetes' ..data symlink swaps all show up as some event there. An event only
says "look again"; what is applied is decided by reading the file (config_file.py)."""

from __future__ import annotations

import os
from collections.abc import Callable


class ConfigWatcher:
    def __init__(self, path: str, on_event: Callable[[], None]):
        """on_event runs in watchdog's thread: it must only flag and wake the loop."""
        self.directory = os.path.dirname(os.path.abspath(path)) or "."
        self.on_event = on_event
        self.observer = None

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        on_event = self.on_event

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                on_event()

        self.observer = Observer()
        self.observer.schedule(Handler(), self.directory, recursive=False)
        self.observer.daemon = True
        self.observer.start()

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None
