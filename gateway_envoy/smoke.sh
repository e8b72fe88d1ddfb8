#!/usr/bin/env bash
# Smoke test of a running gateway (compose, or a port-forward to the cluster's):
#   gateway_envoy/smoke.sh [host:port]
# Registers a throwaway user, then calls through REST/JSON and gRPC.
set -euo pipefail
gateway=${1:-localhost:8080}
email="smoke-$RANDOM@example.com"
password="smoke test password $RANDOM"
body="{\"email\": \"$email\", \"password\": \"$password\"}"

curl -sf "http://$gateway/v1/users:register" -d "$body" >/dev/null
token=$(curl -sf "http://$gateway/v1/users:login" -d "$body" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["accessToken"])')

# A protected method without a token is refused at the edge.
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$gateway/v1/users/me")
[ "$code" = 401 ] || { echo "expected 401 without a token, got $code" >&2; exit 1; }

curl -sf -H "authorization: Bearer $token" "http://$gateway/v1/users/me" >/dev/null
grpcurl -plaintext -protoset "$(dirname "$0")/descriptor_set.binpb" \
    -H "authorization: Bearer $token" -d '{"name": "users/me"}' \
    "$gateway" aimesh.user.v1.UserService/GetUser >/dev/null
curl -sf "http://$gateway/v1/jwks" >/dev/null
echo "gateway $gateway: REST, gRPC and the JWT check work"
