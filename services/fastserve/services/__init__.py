"""The four FastServe services, one package each: a thin gRPC servicer over a core."""
