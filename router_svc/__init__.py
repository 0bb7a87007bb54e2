"""router_svc: validates inference calls, routes them to model backends, meters and settles them."""
