"""The Ray Serve application: GPU model deployment, HTTP ingress and the handle API."""

__all__: list[str] = []
