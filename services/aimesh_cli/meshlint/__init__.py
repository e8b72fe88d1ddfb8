"""`aimesh mesh lint`: the deploy config (k8s/, istio/, gateway_envoy/) checked
against the contracts and the call graph, in the spirit of `istioctl analyze`."""
