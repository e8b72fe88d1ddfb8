"""Rules every contract follows, checked on the generated descriptors."""

from __future__ import annotations

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

from aimesh.chat.v1 import chat_service_pb2
from aimesh.notify.v1 import notify_service_pb2
from aimesh.options.v1 import access_pb2
from aimesh.recommend.v1 import recommend_service_pb2
from aimesh.search.v1 import search_service_pb2
from aimesh.user.v1 import user_service_pb2
from aimesh_runtime.auth import ANONYMOUS, MethodPolicy, Principal, authorize, policies_for
from aimesh_runtime.errors import PermissionDenied, Unauthenticated
from aimesh_runtime.ownership import OwnershipRuleError, rules_for

SERVICES: list[ServiceDescriptor] = [
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"],
    search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],
    recommend_service_pb2.DESCRIPTOR.services_by_name["RecommendService"],
    chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"],
    notify_service_pb2.DESCRIPTOR.services_by_name["NotifyService"],
]
METHODS = [(s.full_name, m) for s in SERVICES for m in s.methods]


@pytest.mark.parametrize("service,method", METHODS, ids=[f"{s}/{m.name}" for s, m in METHODS])
def test_every_method_has_an_access_rule_and_http_mapping(service: str, method: object) -> None:
    options = method.GetOptions()  # type: ignore[attr-defined]
    assert options.HasExtension(access_pb2.access), "a method without a rule is denied to all"
    access = options.Extensions[access_pb2.access]
    assert access.public or list(access.scopes), "a rule names scopes or says public"
    assert access.ownership != access_pb2.OWNERSHIP_UNSPECIFIED, "whose objects may it touch?"
    if access.public:
        assert access.ownership == access_pb2.OWNERSHIP_NONE, "a public method has no caller"
    assert options.HasExtension(annotations_pb2.http), "Envoy transcodes from google.api.http"


def test_only_credential_methods_are_public() -> None:
    public = sorted(name for name, policy in policies_for(SERVICES).items() if policy.public)
    assert public == [
        "/aimesh.user.v1.UserService/ExchangeApiKey",
        "/aimesh.user.v1.UserService/GetJwks",
        "/aimesh.user.v1.UserService/Login",
        "/aimesh.user.v1.UserService/RefreshToken",
        "/aimesh.user.v1.UserService/Register",
    ]


def test_authorize_denies_methods_without_rule_and_missing_scopes() -> None:
    member = Principal(subject="u", scopes=frozenset({"search.read"}), method="jwt")
    with pytest.raises(PermissionDenied):
        authorize("/x.v1.Y/Z", None, member)
    with pytest.raises(PermissionDenied):
        authorize("/x.v1.Y/Z", MethodPolicy(public=False, scopes=("search.write",)), member)
    with pytest.raises(Unauthenticated):
        authorize("/x.v1.Y/Z", MethodPolicy(public=False, scopes=("search.read",)), ANONYMOUS)
    authorize("/x.v1.Y/Z", MethodPolicy(public=False, scopes=("search.read",)), member)
    authorize("/x.v1.Y/Z", MethodPolicy(public=True, scopes=()), ANONYMOUS)


def test_every_ownership_rule_reads_a_real_field() -> None:
    rules = rules_for(SERVICES)  # raises on a missing rule or a field the request lacks
    assert set(rules) == {f"/{s}/{m.name}" for s, m in METHODS}


def test_a_contract_with_a_method_without_ownership_rule_does_not_start() -> None:
    unruled = descriptor_pb2.FileDescriptorProto(
        name="unruled/v1/unruled.proto",
        package="unruled.v1",
        dependency=["aimesh/options/v1/access.proto"],
        message_type=[descriptor_pb2.DescriptorProto(name="Req")],
    )
    method = unruled.service.add(name="UnruledService").method.add(
        name="Do", input_type=".unruled.v1.Req", output_type=".unruled.v1.Req"
    )
    method.options.Extensions[access_pb2.access].scopes.append("x.read")
    pool = descriptor_pool.DescriptorPool()
    for file in (descriptor_pb2.DescriptorProto.DESCRIPTOR.file, access_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    pool.Add(unruled)
    service = pool.FindServiceByName("unruled.v1.UnruledService")
    with pytest.raises(OwnershipRuleError, match="Do has no ownership rule"):
        rules_for([service])


def test_domain_enums_carry_the_contract_numbers() -> None:
    """Recommend's domain enums are stored and cached as numbers: they must stay
    the contract's, which the servicers translate to by name."""
    from aimesh_recommend.experiments import InteractionKind
    from aimesh_recommend.recommender import FallbackReason

    reasons, kinds = recommend_service_pb2.FallbackReason, recommend_service_pb2.InteractionKind
    for reason in FallbackReason:
        if reason is not FallbackReason.NONE:
            assert reasons.Value(f"FALLBACK_REASON_{reason.name}") == reason
    assert reasons.Value("FALLBACK_REASON_UNSPECIFIED") == FallbackReason.NONE
    for kind in InteractionKind:
        assert kinds.Value(f"INTERACTION_KIND_{kind.name}") == kind
    assert len(InteractionKind) == len(kinds.items()) - 1
    assert len(FallbackReason) == len(reasons.items())
