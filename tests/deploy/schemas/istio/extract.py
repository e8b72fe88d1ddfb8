"""Refresh the vendored Istio schemas from the npm package @kubernetes-models/istio.

    npm pack @kubernetes-models/istio@2.3.0 && tar xzf kubernetes-models-istio-2.3.0.tgz
    python tests/deploy/schemas/istio/extract.py package

2.3.0 is the last release that ships plain JSON schemas (3.x ships compiled
validators only), so the schemas are vendored rather than fetched at test time.
"""

import json
import pathlib
import re
import sys

KINDS = [
    "networking.istio.io/v1beta1/DestinationRule",
    "networking.istio.io/v1beta1/VirtualService",
    "networking.istio.io/v1beta1/ServiceEntry",
    "security.istio.io/v1/AuthorizationPolicy",
    "security.istio.io/v1/RequestAuthentication",
    "security.istio.io/v1beta1/PeerAuthentication",
    "telemetry.istio.io/v1alpha1/Telemetry",
]


def main(package: pathlib.Path) -> None:
    here = pathlib.Path(__file__).parent
    for kind in KINDS:
        source = (package / f"{kind}.js").read_text()
        match = re.search(r"const schema = (\{.*?\n\});\n", source, re.S)
        assert match, kind
        schema = json.loads(match.group(1))
        # ObjectMeta is checked by kubernetes-validate; here any object will do.
        schema["properties"]["metadata"] = {"type": "object"}
        name = kind.replace("/", "_") + ".json"
        (here / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
