"""Reload the config file and the partners' secrets on change or on request (SIGHUP).

The watcher polls (`os.stat`, every `interval_s`, 2 s by default) the config
file and every partner secret given as `{file: ...}`: Anthropic keys and
signing keys. Polling, not inotify: Kubernetes updates a mounted Secret or
ConfigMap by swapping a symlink (`..data`), which inotify watches on the file
miss, while `os.stat` follows the link and sees the new inode; it also needs
no dependency and costs a few system calls a second. Secrets from
environment variables cannot change under a running process; a reload picks
them up from `os.environ` all the same.

A reload that fails (invalid YAML or settings, a secret that cannot be read)
changes nothing: the error, which names the setting, is logged and the old
configuration stays in force. The files are looked at again at the next
change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from service.config.loader import ConfigError, load_config
from service.config.settings import GatewaySettings

log = logging.getLogger(__name__)

Fingerprint = tuple[int, int, int, int] | None


def secret_files(settings: GatewaySettings) -> list[Path]:
    """The secret files a reload re-reads: every partner's Anthropic key and signing keys."""
    files: list[Path] = []
    for p in settings.partners:
        refs = [p.api_key, *p.signing.keys.values()]
        files.extend(ref.file for ref in refs if ref.file is not None)
    return files


def _fingerprint(path: Path) -> Fingerprint:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data link shows as a new inode
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ConfigWatcher:
    """Calls `apply(settings)` with freshly loaded settings when a watched file changes.

    `apply` raises `ValueError` (a `RegistryError`, say) to refuse a configuration;
    it must then leave the current one in force.
    """

    def __init__(
        self,
        path: str | Path,
        apply: Callable[[GatewaySettings], None],
        current: GatewaySettings,
        *,
        interval_s: float = 2.0,
        load: Callable[[Path], GatewaySettings] = load_config,
    ) -> None:
        self.path = Path(path)
        self._apply = apply
        self._load = load
        self.interval_s = interval_s
        self._requested = asyncio.Event()
        self._seen = self._snapshot(current)
        self.reloads = 0
        self.failures = 0

    def _snapshot(self, settings: GatewaySettings) -> dict[Path, Fingerprint]:
        return {p: _fingerprint(p) for p in (self.path, *secret_files(settings))}

    def request(self) -> None:
        """Reload at the next turn, changed or not (the SIGHUP handler calls this)."""
        self._requested.set()

    def changed(self) -> bool:
        return any(_fingerprint(p) != fp for p, fp in self._seen.items())

    def reload(self) -> bool:
        """Load and apply now. Returns whether the new configuration is in force."""
        snapshot = {p: _fingerprint(p) for p in self._seen}
        try:
            settings = self._load(self.path)
        except ConfigError as exc:
            self._seen = snapshot
            return self._rejected(exc)
        # watch the files the new config names, even if it fails; a file already watched keeps
        # the fingerprint it had before the load, so a write that lands during the load is
        # seen at the next turn
        seen = self._snapshot(settings)
        seen.update((p, fp) for p, fp in snapshot.items() if p in seen)
        self._seen = seen
        try:
            self._apply(settings)  # raises ValueError (e.g. a RegistryError) when it refuses
        except ValueError as exc:
            return self._rejected(exc)
        except Exception:
            self.failures += 1
            log.exception("reload failed unexpectedly; the configuration may be partly applied")
            return False
        self.reloads += 1
        return True

    def _rejected(self, exc: Exception) -> bool:
        self.failures += 1
        log.error("reload rejected; keeping the current configuration", extra={"error": str(exc)})
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), self.interval_s)
            if stop.is_set():
                return
            requested = self._requested.is_set()
            self._requested.clear()
            if requested or self.changed():
                log.info(
                    "reloading configuration", extra={"trigger": "signal" if requested else "file change"}
                )
                self.reload()
