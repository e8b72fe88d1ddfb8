"""Whose objects an RPC may touch: the ownership rule of every method, enforced once.

Scopes say which methods a caller may call; the ownership rule in each method's
AccessPolicy (see access.proto) says whose objects. The pipeline runs
`OwnershipGuard.check` after authentication and before the handler:

- NONE: nothing to check.
- CALLER: the user named by the rule's field must be the caller ("users/me"
  is rewritten to the caller's name first, so handlers see a real id).
- OWNED: the object named by the field is resolved by the service's own
  store ("who owns this name"); an object the caller may not see answers
  exactly as a missing one does (the service's own NOT_FOUND), one it may see
  but not change answers PERMISSION_DENIED.
- PLATFORM: admins and service accounts only.

Admins (the service's "<service>.admin" scope) and service accounts (the
"mesh.service" scope) pass CALLER and OWNED, except for objects reserved to one
service (the platform's notify topics: `search.*` is written only by a caller
holding "mesh.service.search", the search service's own account). A contract
with a method that has no rule does not start (`rules_for` raises).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor

from aimesh.options.v1 import access_pb2
from aimesh_runtime.auth import INFRASTRUCTURE_PREFIXES, Principal
from aimesh_runtime.errors import InvalidArgument, PermissionDenied, ServiceError

log = logging.getLogger(__name__)

# Carried by service accounts' keys (role "service") and by tokens a service mints
# for itself: calls a backend makes on the platform's behalf, not a person's.
SERVICE_SCOPE = "mesh.service"
USER_PREFIX = "users/"
NEEDS_FIELD = frozenset({access_pb2.OWNERSHIP_CALLER, access_pb2.OWNERSHIP_OWNED})


def service_scope(service: str) -> str:
    """The scope that names one platform service's own account ("mesh.service.search"):
    only the user service grants it, to the account it bootstraps for that service."""
    return f"{SERVICE_SCOPE}.{service}"


class OwnershipRuleError(Exception):
    """A contract's ownership rules are missing or malformed: the server must not start."""


@dataclass(frozen=True)
class Owner:
    """Who owns an object, as its store answers."""

    user_id: str  # "" when the platform owns it
    # Every member of the organisation may read it (a shared search collection).
    shared: bool = False
    # Only this service's own account may change it, not admins nor other services'
    # accounts (the platform's topics: "search" for search.*).
    reserved_to: str = ""
    # Users besides the owner who may change it (topics an admin granted).
    writers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class OwnerResolver:
    """A store's answer to "who owns this name", for one kind of name.

    `owner` returns None when the object does not exist (the handler then
    answers NOT_FOUND itself); `not_found` is the service's own NOT_FOUND for a
    name, used for objects the caller may not see, so the two read the same.
    """

    owner: Callable[[str], Awaitable[Owner | None]]
    not_found: Callable[[str], ServiceError]


@dataclass(frozen=True)
class OwnershipRule:
    kind: int  # access_pb2.Ownership value
    field: tuple[str, ...]  # the dotted path, split
    reads_only: bool
    admin_scope: str  # "<service>.admin"


def is_service_account(principal: Principal) -> bool:
    return SERVICE_SCOPE in principal.scopes


def rules_for(services: Iterable[ServiceDescriptor]) -> dict[str, OwnershipRule]:
    """Map '/pkg.Service/Method' to its ownership rule; raise if any method lacks one."""
    rules: dict[str, OwnershipRule] = {}
    problems: list[str] = []
    for service in services:
        # aimesh.search.v1 -> search.admin
        admin_scope = service.full_name.split(".")[1] + ".admin"
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            options = method.GetOptions()
            access = options.Extensions[access_pb2.access]
            if access.ownership == access_pb2.OWNERSHIP_UNSPECIFIED:
                problems.append(f"{path} has no ownership rule")
                continue
            field = tuple(access.ownership_field.split(".")) if access.ownership_field else ()
            if access.ownership in NEEDS_FIELD and not field:
                problems.append(f"{path}: ownership_field is required for its rule")
                continue
            if field and not _field_exists(method.input_type, field):
                problems.append(f"{path}: no string field {access.ownership_field} in its request")
                continue
            rules[path] = OwnershipRule(access.ownership, field, access.reads_only, admin_scope)
    if problems:
        raise OwnershipRuleError("; ".join(problems))
    return rules


def _field_exists(message: Any, path: tuple[str, ...]) -> bool:
    for index, name in enumerate(path):
        field = message.fields_by_name.get(name)
        if field is None:
            return False
        if index == len(path) - 1:
            return field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated
        if field.message_type is None:
            return False
        message = field.message_type
    return False


def _holders(message: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """The messages that hold the last field of `path` (several through repeated fields)."""
    if len(path) == 1:
        yield message
        return
    head = path[0]
    field = message.DESCRIPTOR.fields_by_name[head]
    if field.is_repeated:
        for element in getattr(message, head):
            yield from _holders(element, path[1:])
    elif message.HasField(head):
        yield from _holders(getattr(message, head), path[1:])


def field_values(message: Any, path: tuple[str, ...]) -> list[str]:
    return [getattr(holder, path[-1]) for holder in _holders(message, path)]


class OwnershipGuard:
    """Checks each request against its method's ownership rule."""

    def __init__(
        self, rules: Mapping[str, OwnershipRule], resolvers: Mapping[str, OwnerResolver]
    ) -> None:
        """`resolvers` by kind of name: the first segment of a resource name
        ("collections" for "collections/x/documents/y"), or, for values that
        are not names (a topic), the rule's field name ("topic")."""
        self._rules = rules
        self._resolvers = resolvers

    def rule(self, method: str) -> OwnershipRule | None:
        rule = self._rules.get(method)
        if rule is None and not method.startswith(INFRASTRUCTURE_PREFIXES):
            # Unreachable for methods of the contracts (rules_for refused to start);
            # anything else is closed.
            raise PermissionDenied(f"{method} has no ownership rule", reason="NO_RULE")
        return rule

    async def check(self, method: str, principal: Principal, request: Any) -> None:
        """Raise unless `principal` may touch what `request` names."""
        rule = self.rule(method)
        if rule is None or rule.kind == access_pb2.OWNERSHIP_NONE:
            return
        privileged = is_service_account(principal) or rule.admin_scope in principal.scopes
        if rule.kind == access_pb2.OWNERSHIP_PLATFORM:
            if not privileged:
                raise PermissionDenied(
                    f"only admins and service accounts may call {method.rsplit('/', 1)[-1]}",
                    reason="PLATFORM_ONLY",
                )
            return
        if rule.kind == access_pb2.OWNERSHIP_CALLER:
            self._check_caller(rule, principal, privileged, request)
            return
        for value in field_values(request, rule.field):
            if value:
                await self._check_owned(rule, principal, privileged, value)

    @staticmethod
    def _check_caller(
        rule: OwnershipRule, principal: Principal, privileged: bool, request: Any
    ) -> None:
        me = USER_PREFIX + principal.subject
        for holder in _holders(request, rule.field):
            value: str = getattr(holder, rule.field[-1])
            if value == USER_PREFIX + "me" or value.startswith(USER_PREFIX + "me/"):
                value = me + value[len(USER_PREFIX + "me") :]
                setattr(holder, rule.field[-1], value)
            if not value or privileged:
                continue
            user = "/".join(value.split("/", 2)[:2])
            if user != me:
                raise PermissionDenied(
                    f"{'.'.join(rule.field)} names another user; only its owner may do this",
                    reason="NOT_OWNER",
                    metadata={"field": ".".join(rule.field)},
                )

    async def _check_owned(
        self, rule: OwnershipRule, principal: Principal, privileged: bool, name: str
    ) -> None:
        kind = name.split("/", 1)[0] if "/" in name else rule.field[-1]
        resolver = self._resolvers.get(kind)
        if resolver is None:  # not a name of this service's (or a resolver is missing)
            log.warning("no owner resolver for %r (field %s)", kind, ".".join(rule.field))
            raise InvalidArgument.field(".".join(rule.field), f"{name!r} is not a name known here")
        owner = await resolver.owner(name)
        if owner is None:
            return  # the handler answers NOT_FOUND (or creates it)
        if owner.reserved_to:
            if service_scope(owner.reserved_to) in principal.scopes:
                return
            if rule.reads_only and owner.shared:
                return
            raise PermissionDenied(
                f"{name} is reserved to the {owner.reserved_to} service's own account",
                reason="RESERVED_TO_SERVICES",
                metadata={"service": owner.reserved_to},
            )
        if privileged:
            return
        mine = bool(owner.user_id) and owner.user_id == principal.subject
        if mine or principal.subject in owner.writers:
            return
        if not owner.shared:
            raise resolver.not_found(name)
        if not rule.reads_only:
            raise PermissionDenied(
                f"{name} is shared for reading; only its owner may change it", reason="NOT_OWNER"
            )
