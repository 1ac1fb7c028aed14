"""Azure role definitions and assignments, as ARM evaluates them against an action.

Invariants: a role allows an action when the action matches one of its ``Actions`` and none of
its ``NotActions``; matching is case-insensitive and ``*`` stands for any run of characters,
``/`` included (``Microsoft.Network/*/read``); ``DataActions`` never grant a control-plane
action. An assignment covers its scope and every scope below it (an empty scope: the whole
subscription) and, when it names a VM, only that VM's managed identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.simulator import ids
from sidecar.simulator.errors import ControlError


def _pattern(action: str) -> re.Pattern[str]:
    return re.compile(
        "^" + ".*".join(re.escape(part) for part in action.split("*")) + "$", re.IGNORECASE
    )


@dataclass(frozen=True)
class RoleDefinition:
    name: str
    actions: tuple[str, ...]
    not_actions: tuple[str, ...] = ()

    def allows(self, action: str) -> bool:
        if not any(_pattern(granted).match(action) for granted in self.actions):
            return False
        return not any(_pattern(removed).match(action) for removed in self.not_actions)

    def to_json(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            "Actions": list(self.actions),
            "NotActions": list(self.not_actions),
        }


@dataclass(frozen=True)
class Assignment:
    role: RoleDefinition
    scope: str = ""
    vm: str = ""

    def covers(self, action: str, scope: str, vm: str) -> bool:
        if self.scope and not ids.within(scope, self.scope):
            return False
        if self.vm and self.vm.casefold() != vm.casefold():
            return False
        return self.role.allows(action)

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role.to_json(), "scope": self.scope, "vm": self.vm}


def _field(body: Mapping[str, Any], *names: str) -> Any:
    """A field by any of its spellings (the CLI's ``Actions``, ARM's ``actions``)."""
    folded = {str(key).casefold(): value for key, value in body.items()}
    for name in names:
        if name.casefold() in folded:
            return folded[name.casefold()]
    return None


def _strings(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ControlError(400, f"'{what}' must be a list of action strings")
    return tuple(value)


def parse_role(body: object) -> RoleDefinition:
    """A custom role as ``az role definition create`` takes it (``Name``, ``Actions``,
    ``NotActions``, ...), or as ARM returns one (``properties.permissions[]``)."""
    if not isinstance(body, Mapping):
        raise ControlError(400, "'role' must be an Azure role definition (a JSON object)")
    props = _field(body, "properties")
    source: Mapping[str, Any] = props if isinstance(props, Mapping) else body
    name = _field(source, "roleName", "Name") or "custom role"
    permissions = _field(source, "permissions")
    if isinstance(permissions, list):
        actions: list[str] = []
        not_actions: list[str] = []
        for block in permissions:
            if not isinstance(block, Mapping):
                raise ControlError(400, "'permissions' must be a list of objects")
            actions += _strings(_field(block, "actions"), "actions")
            not_actions += _strings(_field(block, "notActions"), "notActions")
        return RoleDefinition(str(name), tuple(actions), tuple(not_actions))
    actions_value = _field(source, "Actions")
    if actions_value is None:
        raise ControlError(400, "the role has no 'Actions' (nor 'permissions')")
    return RoleDefinition(
        str(name),
        _strings(actions_value, "Actions"),
        _strings(_field(source, "NotActions"), "NotActions"),
    )


def _assignment(body: Mapping[str, Any]) -> Assignment:
    scope, vm = body.get("scope", ""), body.get("vm", "")
    if not isinstance(scope, str) or not isinstance(vm, str):
        raise ControlError(400, "'scope' and 'vm' must be strings")
    return Assignment(parse_role(body.get("role")), scope, vm)


def parse_assignments(body: Mapping[str, Any]) -> list[Assignment]:
    """``{"role": {...}, "scope"?, "vm"?}`` or ``{"assignments": [{"role", "scope", "vm"}]}``."""
    found = []
    if "role" in body:
        found.append(_assignment(body))
    items = body.get("assignments", [])
    if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
        raise ControlError(400, "'assignments' must be a list of {role, scope, vm} objects")
    found += [_assignment(item) for item in items]
    return found
