"""Kernel settings svcproxy changes, each recorded with the value it had before
so it can be put back (kube-proxy never reverts its sysctls; k/k#123992).

One JSON file, {name: previous value}, shared by the plugins that change
settings (ipvs, metallb, conntrack); the first recorded value wins, so a
restart does not record svcproxy's own value as "previous". Names are
/proc/sys paths ("net/ipv4/ip_forward") or absolute paths for module
parameters ("/sys/module/nf_conntrack/parameters/hashsize").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from .netns import in_netns

log = logging.getLogger(__name__)

DEFAULT_BACKUP = "/var/lib/svcproxy/sysctl-backup.json"


def _path(name: str) -> str:
    return name if name.startswith("/") else f"/proc/sys/{name}"


def dotted(name: str) -> str:
    return name if name.startswith("/") else name.replace("/", ".")


#: (namespace, sysctl) already warned about as unwritable
_WARNED: set[tuple[str | None, str]] = set()


class SysctlStore:
    def __init__(self, backup_path: str | None = DEFAULT_BACKUP,
                 netns: str | None = None) -> None:
        #: None: record nothing (a throwaway namespace nobody restores)
        self.backup_path = backup_path
        self.netns = netns

    def follow_datapath(self, config: Any, datapath: str, explicit_backup: bool) -> None:
        """Without a namespace of its own, work in the one the active datapath
        programs (datapath option `netns`: tests, benchmarks, the demo); a
        throwaway namespace's old values are not recorded unless a backup file
        was configured."""
        if self.netns is not None:
            return
        netns = config.svcproxy.datapath_options.get(datapath, {}).get("netns")
        if netns:
            self.netns = netns
            if not explicit_backup:
                self.backup_path = None

    def read(self, name: str) -> str | None:
        with in_netns(self.netns):
            try:
                with open(_path(name)) as f:
                    return f.read().strip()
            except OSError:
                return None

    def write(self, name: str, value: str) -> None:
        with in_netns(self.netns), open(_path(name), "w") as f:
            f.write(value)

    def backup(self) -> dict[str, str]:
        if self.backup_path is None:
            return {}
        try:
            with open(self.backup_path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save(self, backup: dict[str, str]) -> None:
        if self.backup_path is None:
            return
        if not backup:
            if os.path.exists(self.backup_path):
                os.remove(self.backup_path)
            return
        os.makedirs(os.path.dirname(self.backup_path) or ".", exist_ok=True)
        tmp = self.backup_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(backup, f, indent=2, sort_keys=True)
        os.replace(tmp, self.backup_path)

    def ensure(self, name: str, value: str, only_raise: bool = False) -> bool:
        """Set `name` to `value` if it differs (with `only_raise`: only if the
        current value is lower), recording the previous value once. Returns
        whether it wrote. A setting this kernel lacks is skipped (logged)."""
        current = self.read(name)
        if current is None:
            log.debug("%s does not exist here; not set", dotted(name))
            return False
        if current == value:
            return False
        if only_raise:
            try:
                if int(current) >= int(value):
                    return False
            except ValueError:
                pass
        backup = self.backup()
        backup.setdefault(name, current)
        self._save(backup)
        self.write(name, value)
        log.info("%s: %s -> %s", dotted(name), current, value)
        return True

    def ensure_or_warn(self, name: str, value: str, only_raise: bool = False) -> bool:
        """ensure(), but a setting that cannot be written (a container without
        privileges has a read-only /proc/sys) is logged once, with the way out,
        and svcproxy goes on without it."""
        try:
            return self.ensure(name, value, only_raise)
        except OSError as exc:
            key = (self.netns, name)
            if key not in _WARNED:
                _WARNED.add(key)
                log.warning("cannot set %s to %s (%s); run `svcproxy prepare` before "
                            "svcproxy starts (the DaemonSet's privileged init container "
                            "does) or run svcproxy privileged", dotted(name), value,
                            exc.strerror or exc)
            return False

    def restore(self, names: Iterable[str]) -> list[str]:
        """Put back the recorded previous values of `names`; returns what it did."""
        backup = self.backup()
        lines = []
        for name in names:
            if name not in backup:
                continue
            previous = backup.pop(name)
            try:
                self.write(name, previous)
                lines.append(f"sysctl {dotted(name)} restored to {previous}")
            except OSError as exc:
                lines.append(f"sysctl {dotted(name)}: cannot restore {previous}: {exc}")
        self._save(backup)
        return lines
